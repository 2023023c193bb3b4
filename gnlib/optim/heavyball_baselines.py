"""Shampoo and PSGD (Kron) baselines from heavyball on the hidden matrices, AdamW on the rest.

``"shampoo"`` is heavyball's ``KLShampoo`` (Shampoo with Kronecker factors accumulated as a KL
minimization; the step is ⊗ᵢ Qᵢ diag(dᵢ^-1/2) Qᵢᵀ applied to a momentum EMA of the gradient) and ``"psgd"``
its ``PSGDKron`` (Li's preconditioned SGD with a Kronecker-factored preconditioner fitted to whiten the
gradient). Both take the 2-D tensors that Muon takes (:func:`~gnlib.optim.factory.split_params`); the
embedding, the head and every 1-D tensor get AdamW, as one :class:`~gnlib.optim.composite.CompositeOptimizer`.
heavyball runs eagerly here (its ``torch.compile`` path is switched off: inductor fails on some CPU
kernels), with its state kept in the parameters' dtype. docs/optimizers.md, section "Shampoo and PSGD".
"""

from __future__ import annotations

from typing import Any

import heavyball
import heavyball.utils
import torch
from torch import Tensor

from gnlib.checks import Rule, integer, number, optional
from gnlib.optim.composite import CompositeOptimizer
from gnlib.optim.options import BETAS, NAMES, Schema
from gnlib.runtime import is_finite_number

heavyball.utils.compile_mode = None

#: Each option of a heavyball baseline: (default, rule); the options both share are added by :func:`_schema`.
_OWN: dict[str, dict[str, tuple[Any, Rule]]] = {
    "shampoo": dict(
        lr=(3e-3, number(0)),
        betas=((0.9, 0.95), BETAS),
        shampoo_beta=(0.95, number(0.0, below=1.0)),
        eps=(1e-8, number(0, strict=True)),
        precondition_frequency=(10, integer(1)),
        max_precond_dim=(4096, integer(1)),
    ),
    "psgd": dict(
        lr=(1e-3, number(0)),
        beta=(0.9, number(0.0, below=1.0)),
        precond_lr=(0.1, number(0, strict=True)),
        preconditioner_update_probability=(
            0.1,
            Rule(lambda v: is_finite_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        ),
        max_size_triangular=(4096, integer(1)),
    ),
}
_SHARED: dict[str, tuple[Any, Rule]] = dict(
    weight_decay=(0.0, number(0)),
    grad_clip=(None, optional(number(0, strict=True))),
    adamw_lr=(3e-3, optional(number(0))),
    adamw_betas=((0.9, 0.95), BETAS),
    adamw_eps=(1e-8, number(0)),
    adamw_weight_decay=(0.0, number(0)),
    adamw_params=(None, NAMES),
)


def _schema(name: str) -> Schema:
    options = {**_OWN[name], **_SHARED}
    return Schema(name, {k: d for k, (d, _) in options.items()}, {k: r for k, (_, r) in options.items()})


#: The options of the heavyball baselines: default and rule.
SCHEMAS: dict[str, Schema] = {name: _schema(name) for name in _OWN}


def make_heavyball(name: str, named: dict[str, Tensor], hp: dict[str, Any], matrices: list[str]) -> CompositeOptimizer:
    """Heavyball's optimizer ``name`` on ``matrices`` and AdamW on the other tensors of ``named``.

    Args:
        name: ``"shampoo"`` or ``"psgd"``.
        named: every tensor to optimize, by name.
        hp: the options :data:`SCHEMAS` validated (``grad_clip`` already taken out).
        matrices: the tensors heavyball preconditions.
    """
    others = [n for n in named if n not in set(matrices)]
    inner: dict[str, torch.optim.Optimizer] = {}
    if matrices:
        params = [named[n] for n in matrices]
        dtype = str(params[0].dtype).removeprefix("torch.")
        if name == "shampoo":
            inner[name] = heavyball.KLShampoo(
                params,
                lr=hp["lr"],
                betas=tuple(hp["betas"]),
                shampoo_beta=hp["shampoo_beta"],
                eps=hp["eps"],
                weight_decay=hp["weight_decay"],
                precondition_frequency=hp["precondition_frequency"],
                max_precond_dim=hp["max_precond_dim"],
                storage_dtype=dtype,
            )
        else:
            inner[name] = heavyball.PSGDKron(
                params,
                lr=hp["lr"],
                beta=hp["beta"],
                weight_decay=hp["weight_decay"],
                precond_lr=hp["precond_lr"],
                preconditioner_update_probability=float(hp["preconditioner_update_probability"]),
                max_size_triangular=hp["max_size_triangular"],
                q_dtype=dtype,
                storage_dtype=dtype,
            )
    if others:
        inner["adamw"] = torch.optim.AdamW(
            [(n, named[n]) for n in others],
            lr=hp["lr"] if hp["adamw_lr"] is None else hp["adamw_lr"],
            betas=tuple(hp["adamw_betas"]),
            eps=hp["adamw_eps"],
            weight_decay=hp["adamw_weight_decay"],
        )
    return CompositeOptimizer(inner)
