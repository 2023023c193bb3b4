"""Baseline optimizers by name, with validated hyperparameters and the Muon/AdamW parameter split.

``make_optimizer(name, model, **hyperparameters)`` builds ``"adamw"``, ``"muon"`` (Muon on the hidden
matrices, AdamW on the rest: :func:`split_params`), ``"soap"``, ``"sgd"``, or heavyball's ``"shampoo"`` and
``"psgd"`` on the same matrices (:mod:`gnlib.optim.heavyball_baselines`), an object the train loop drives
like any torch optimizer: every param group has ``"lr"`` and ``"initial_lr"`` (the train loop sets
``group["lr"] = group["initial_lr"] * schedule(step)``), plus ``step``, ``zero_grad``, ``state_dict`` and
``load_state_dict``. :data:`SCHEMAS` declares each option's default (gnlib's, ``protocol="gnlib"``;
:mod:`gnlib.experiment.protocols` holds the reference's) and rule; ``grad_clip`` clips before each step in
the groups of :func:`clip_groups`. Defaults and their sources: docs/optimizers.md, section "AdamW, Muon, SGD"
and docs/optimizers.md, section "SOAP"; clipping: docs/optimizers.md, section "Gradient clipping".
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from gnlib.checks import FLAG, Rule, integer, number, optional
from gnlib.optim.composite import CompositeOptimizer
from gnlib.optim.heavyball_baselines import SCHEMAS as HEAVYBALL_SCHEMAS
from gnlib.optim.heavyball_baselines import make_heavyball
from gnlib.optim.muon import NS_DTYPES, Muon
from gnlib.optim.options import BETAS, NAMES, Schema
from gnlib.optim.soap import SOAP, SOAP_SCHEMA
from gnlib.runtime import check_choice, invalid

NamedTensors = Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]

#: Names the study routes to AdamW under Muon: the embedding and the output head.
EMBEDDING_AND_HEAD = ("embed.weight", "head.weight")

_GRAD_CLIP = optional(number(0, strict=True))


def _sgd_nesterov_needs_momentum(hp: dict[str, Any]) -> None:
    if hp["nesterov"] and hp["momentum"] == 0:
        raise ValueError("optimizer 'sgd': nesterov=True needs momentum > 0; allowed momentum: a number in (0, 1)")


#: Each baseline's options: default and rule (the one place they are defined; ``DEFAULTS`` reads them).
SCHEMAS: dict[str, Schema] = {
    "adamw": Schema(
        "adamw",
        defaults=dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=None),
        rules=dict(lr=number(0), betas=BETAS, eps=number(0), weight_decay=number(0), grad_clip=_GRAD_CLIP),
    ),
    "muon": Schema(
        "muon",
        defaults=dict(
            lr=0.02,
            momentum=0.95,
            nesterov=True,
            weight_decay=0.0,
            ns_steps=5,
            adjust_lr_fn="original",
            bias_correction=False,
            ns_dtype="bfloat16",
            grad_clip=None,
            adamw_lr=3e-3,
            adamw_betas=(0.9, 0.95),
            adamw_eps=1e-8,
            adamw_weight_decay=0.0,
            adamw_params=None,
        ),
        rules=dict(
            lr=number(0),
            momentum=number(0, below=1),
            nesterov=FLAG,
            weight_decay=number(0),
            ns_steps=integer(1, 99),
            adjust_lr_fn=Rule(lambda v: v in ("original", "match_rms_adamw"), "'original' or 'match_rms_adamw'"),
            bias_correction=FLAG,
            ns_dtype=Rule(lambda v: v in NS_DTYPES, f"one of {list(NS_DTYPES)}"),
            grad_clip=_GRAD_CLIP,
            adamw_lr=optional(number(0)),
            adamw_betas=BETAS,
            adamw_eps=number(0),
            adamw_weight_decay=number(0),
            adamw_params=NAMES,
        ),
    ),
    "soap": Schema(
        "soap",
        defaults={**SOAP_SCHEMA.defaults, "grad_clip": None},
        rules={**SOAP_SCHEMA.rules, "grad_clip": _GRAD_CLIP},
    ),
    "sgd": Schema(
        "sgd",
        defaults=dict(lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0, grad_clip=None),
        rules=dict(
            lr=number(0), momentum=number(0, below=1), nesterov=FLAG, weight_decay=number(0), grad_clip=_GRAD_CLIP
        ),
        checks=(_sgd_nesterov_needs_momentum,),
    ),
}

SCHEMAS.update(HEAVYBALL_SCHEMAS)  # shampoo and psgd (gnlib.optim.heavyball_baselines)

#: Each baseline's default hyperparameters (read from :data:`SCHEMAS`).
DEFAULTS: dict[str, dict[str, Any]] = {name: dict(schema.defaults) for name, schema in SCHEMAS.items()}


def _named(model: nn.Module | NamedTensors) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return dict(model.named_parameters())
    named = dict(model.items() if isinstance(model, Mapping) else model)
    if not all(isinstance(t, Tensor) for t in named.values()):
        raise ValueError("model must be an nn.Module, a dict name -> tensor, or (name, tensor) pairs")
    return named


def split_params(named_params: NamedTensors, adamw_names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Split tensor names into hidden matrices (for Muon) and the rest (for AdamW).

    Matrices are the 2-D tensors not named in ``adamw_names``; everything else (embeddings, head,
    norm gains, biases, any non-2-D tensor) is "other". Works on any named tensors, module
    parameters or plain leaf tensors (e.g. the inner variables of a Gauss-Newton solver).

    Args:
        named_params: dict name -> tensor, or ``(name, tensor)`` pairs (e.g. ``model.named_parameters()``).
        adamw_names: 2-D tensors to keep out of Muon. ``None``: whichever of ``embed.weight`` and
            ``head.weight`` exist (the transformer's embedding and output head).

    Returns:
        ``(matrix_names, other_names)``, each in the input order.

    Raises:
        ValueError: ``adamw_names`` names a tensor that does not exist.
    """
    named = _named(named_params)
    if adamw_names is None:
        keep_out = {n for n in EMBEDDING_AND_HEAD if n in named}
    else:
        keep_out = set(adamw_names)
        missing = sorted(keep_out - set(named))
        if missing:
            raise invalid("", "adamw_params", missing, f"names of the model's tensors, {list(named)}")
    matrices = [n for n, t in named.items() if t.dim() == 2 and n not in keep_out]
    others = [n for n in named if n not in set(matrices)]
    return matrices, others


def make_optimizer(name: str, model: nn.Module | NamedTensors, **hyperparameters: Any):
    """Build baseline optimizer ``name`` over the parameters of ``model``.

    Args:
        name: ``"adamw"``, ``"muon"``, ``"soap"``, ``"sgd"``, ``"shampoo"`` or ``"psgd"``.
        model: an ``nn.Module`` (its ``named_parameters()``), or named tensors (dict or pairs).
        **hyperparameters: overrides of ``DEFAULTS[name]`` (docs/optimizers.md), checked by ``SCHEMAS[name]``.

    Returns:
        A torch optimizer (adamw, soap, sgd) or a :class:`CompositeOptimizer` (muon, shampoo, psgd), with
        ``group["initial_lr"] = group["lr"]`` set on every param group.

    Raises:
        ValueError: unknown ``name``, unknown hyperparameter, or an invalid value; raised before any
            state is allocated.
    """
    check_choice("name", name, list(SCHEMAS))
    hp = SCHEMAS[name].validate(hyperparameters)
    grad_clip = hp.pop("grad_clip")
    named = _named(model)
    if name == "adamw":
        opt = torch.optim.AdamW(list(named.items()), **hp)
    elif name == "sgd":
        opt = torch.optim.SGD(list(named.items()), **hp)
    elif name == "soap":
        opt = SOAP(list(named.items()), **hp)
    elif name in HEAVYBALL_SCHEMAS:
        opt = make_heavyball(name, named, hp, split_params(named, hp["adamw_params"])[0])
    else:
        opt = _muon_with_adamw(named, hp)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    if grad_clip is not None:
        groups = clip_groups(list(named), _clipped_apart(name, named, hp))
        opt.register_step_pre_hook(
            lambda *_: clip_gradients([[named[n] for n in group] for group in groups], grad_clip)
        )
    return opt


def clip_groups(names: Sequence[str], apart: Sequence[str]) -> list[list[str]]:
    """The reference's gradient-clipping groups: the names in ``apart``, then every other name; empty ones dropped.

    The reference clips each chain of an ``optax.multi_transform`` to its own global norm (two
    ``optax.chain(clip_by_global_norm(c), ...)``): under Muon and GN's inner loop the ``{wte, lm_head}``
    chain and the hidden chain (Muon's matrices and the norm gains); under SOAP the ≥2-D chain and the 1-D one.
    """
    first = [n for n in names if n in set(apart)]
    rest = [n for n in names if n not in set(apart)]
    return [group for group in (first, rest) if group]


def _clipped_apart(name: str, named: dict[str, Tensor], hp: dict[str, Any]) -> list[str]:
    """The tensors baseline ``name`` clips apart from the rest (:func:`clip_groups`); none: one global norm."""
    if name == "muon" or name in HEAVYBALL_SCHEMAS:
        return [n for n in split_params(named, hp["adamw_params"])[1] if named[n].dim() == 2]
    if name == "soap":
        return [n for n, tensor in named.items() if tensor.dim() >= 2]
    return []


def clip_gradients(groups: Sequence[Sequence[Tensor]], max_norm: float) -> None:
    """Clip the ``.grad`` of each group of tensors to global norm ``max_norm`` (``clip_grad_norm_`` per group)."""
    for tensors in groups:
        torch.nn.utils.clip_grad_norm_(list(tensors), max_norm)


def _muon_with_adamw(named: dict[str, Tensor], hp: dict[str, Any]) -> CompositeOptimizer:
    """Muon on the hidden matrices and AdamW on the rest, as one composite optimizer."""
    matrices, others = split_params(named, hp["adamw_params"])
    inner: dict[str, torch.optim.Optimizer] = {}
    if matrices:
        inner["muon"] = Muon(
            [(n, named[n]) for n in matrices],
            bias_correction=hp["bias_correction"],
            ns_dtype=hp["ns_dtype"],
            lr=hp["lr"],
            momentum=hp["momentum"],
            nesterov=hp["nesterov"],
            weight_decay=hp["weight_decay"],
            ns_steps=hp["ns_steps"],
            adjust_lr_fn=hp["adjust_lr_fn"],
        )
    if others:
        inner["adamw"] = torch.optim.AdamW(
            [(n, named[n]) for n in others],
            lr=hp["lr"] if hp["adamw_lr"] is None else hp["adamw_lr"],
            betas=hp["adamw_betas"],
            eps=hp["adamw_eps"],
            weight_decay=hp["adamw_weight_decay"],
        )
    return CompositeOptimizer(inner)
