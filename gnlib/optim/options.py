"""Declared option schemas: each option's default and rule in one place, checked without building anything.

A :class:`Schema` maps every option of one optimizer to its default and a :class:`~gnlib.checks.Rule` (a
predicate and the allowed values in words), plus cross-option checks. :meth:`Schema.validate` merges the given options
into the defaults and raises ``ValueError`` naming the optimizer, the option, the value and the allowed
values. The registry (:mod:`gnlib.optim.registry`), the optimizers' constructors, run specs, the command
line and sweeps all validate through these schemas. No rule takes a ``bool`` for a number, nor a number
given as text (the message adds :func:`gnlib.runtime.numeric_text_hint`), as in :mod:`gnlib.checks`. What a
refusal looks like: docs/outputs-and-reliability.md, section "Where results go"; why frozen dataclasses
rather than pydantic: docs/architecture.md, section "Option schemas".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gnlib.checks import Rule
from gnlib.runtime import invalid, is_finite_number

BETAS = Rule(
    lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(is_finite_number(b) and 0.0 <= b < 1.0 for b in v),
    "a pair (beta1, beta2), each in [0, 1)",
)
NAMES = Rule(
    lambda v: v is None or (not isinstance(v, (str, Mapping)) and all(isinstance(n, str) for n in v)),
    "None or a list of tensor names",
)
ANY = Rule(lambda v: True, "any value")


@dataclass(frozen=True)
class Schema:
    """The options of one optimizer: defaults, rules and cross-option checks.

    Attributes:
        name: the optimizer's name, used in messages (``"optimizer 'name'"``).
        defaults: option -> default value (the one place the default is defined).
        rules: option -> :class:`Rule`; every key of ``defaults`` has one.
        checks: functions of the merged options that raise ``ValueError`` on a bad combination.
    """

    name: str
    defaults: Mapping[str, Any]
    rules: Mapping[str, Rule]
    checks: tuple[Callable[[dict[str, Any]], None], ...] = field(default=())

    def __post_init__(self) -> None:
        """Every option has exactly one default and one rule."""
        if set(self.defaults) != set(self.rules):
            raise AssertionError(
                f"schema {self.name!r}: options without a rule or default {set(self.defaults) ^ set(self.rules)}"
            )

    @property
    def owner(self) -> str:
        """How messages name the optimizer."""
        return f"optimizer {self.name!r}"

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``given`` into the defaults and check every option; return the merged options.

        Raises:
            ValueError: an unknown option (listing the known ones), a value its rule refuses (naming the
                option, the value and the allowed values), or a bad combination.
        """
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.owner} got unknown option(s) {unknown}; allowed: {sorted(self.defaults)}")
        options = {**self.defaults, **given}
        for key, value in options.items():
            if not self.rules[key].test(value):
                raise invalid(self.owner, key, value, self.rules[key].allowed)
        for check in self.checks:
            check(options)
        return options
