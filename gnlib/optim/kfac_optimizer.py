"""K-FAC as an optimizer: each linear layer's gradient preconditioned by its damped Kronecker factors.

Each step draws ``micro_batches`` batches and averages their gradients; the first one also gives every
``nn.Linear``'s factors A (inputs) and B (output-space gradients at targets sampled from the model: the
Fisher, the GGN in expectation) through :func:`gnlib.optim.kfac.kfac_factors`, kept as an EMA over steps.
Every ``inverse_every`` steps the factors' eigendecompositions are refreshed. A layer moves by
W ← (1 − ηλ_wd) W − η (B ⊗ A + λI)⁻¹ g (:func:`~gnlib.optim.kfac.kronecker_solve`); the embedding, the norms
and any layer with a factor side over ``max_factor_dim`` get AdamW. docs/optimizers.md, section "K-FAC".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gnlib.checks import Rule, choice, integer, number, optional
from gnlib.distributed import all_reduce_mean
from gnlib.losses import CrossEntropy, Loss
from gnlib.optim.factory import clip_gradients
from gnlib.optim.kfac import (
    FISHER_TYPES,
    KroneckerEigen,
    KroneckerFactors,
    kfac_factors,
    kronecker_eigen,
    kronecker_solve,
)
from gnlib.optim.options import BETAS, Schema

#: K-FAC's options: default and rule.
SCHEMA = Schema(
    "kfac",
    defaults=dict(
        lr=0.1,
        micro_batches=1,
        damping=0.1,
        factor_decay=0.95,
        inverse_every=10,
        fisher="mc",
        mc_samples=1,
        max_factor_dim=4096,
        adamw_lr=3e-3,
        adamw_betas=(0.9, 0.95),
        adamw_eps=1e-8,
        weight_decay=0.0,
        grad_clip=None,
        loss=None,
        seed=0,
    ),
    rules=dict(
        lr=number(0.0, strict=True),
        micro_batches=integer(1),
        damping=number(0.0),
        factor_decay=number(0.0, below=1.0),
        inverse_every=integer(1),
        fisher=choice(FISHER_TYPES),
        mc_samples=integer(1),
        max_factor_dim=integer(1),
        adamw_lr=optional(number(0.0)),
        adamw_betas=BETAS,
        adamw_eps=number(0.0, strict=True),
        weight_decay=number(0.0),
        grad_clip=optional(number(0.0, strict=True)),
        loss=Rule(lambda v: v is None or isinstance(v, Loss), "None (cross-entropy) or a gnlib.losses.Loss"),
        seed=integer(0),
    ),
)


class KFAC:
    """K-FAC over ``model``, drawing its batches from ``batches`` (module docstring).

    Args:
        model: the model; its ``nn.Linear`` layers get Kronecker factors.
        batches: zero-argument callable returning the next ``(inputs, targets)``.
        **options: :data:`SCHEMA`'s options (``lr`` the K-FAC step size, ``damping`` λ, ...).

    Raises:
        ValueError: an option its rule refuses (before anything is built).
    """

    draws_batches = True

    def __init__(self, model: nn.Module, batches: Callable[[], tuple[Tensor, Tensor]], **options: Any) -> None:
        """Check the options, find the layers that get factors and build AdamW over the other tensors."""
        o = SCHEMA.validate(options)
        self.model, self.batches, self.options = model, batches, o
        self.loss: Loss = o["loss"] or CrossEntropy()
        named = dict(model.named_parameters())
        self.layers = {  # weight name -> bias name (None without one), for every layer small enough
            f"{prefix}.weight" if prefix else "weight": (f"{prefix}.bias" if prefix else "bias")
            if m.bias is not None
            else None
            for prefix, m in model.named_modules()
            if isinstance(m, nn.Linear)
            and (f"{prefix}.weight" if prefix else "weight") in named
            and max(m.in_features + (m.bias is not None), m.out_features) <= o["max_factor_dim"]
        }
        covered = set(self.layers) | {b for b in self.layers.values() if b is not None}
        self.adamw_names = [n for n in named if n not in covered]
        self.adamw = (
            torch.optim.AdamW(
                [named[n] for n in self.adamw_names],
                lr=o["lr"] if o["adamw_lr"] is None else o["adamw_lr"],
                betas=tuple(o["adamw_betas"]),
                eps=o["adamw_eps"],
                weight_decay=o["weight_decay"],
            )
            if self.adamw_names
            else None
        )
        self.factors: dict[str, KroneckerFactors] = {}
        self.eigen: dict[str, KroneckerEigen] = {}
        self.steps = 0

    def step(self) -> dict[str, Any]:
        """One K-FAC step; returns ``loss`` (the micro-batches' mean), ``tokens`` and ``grad_equivalents``."""
        o, named = self.options, dict(self.model.named_parameters())
        grads = {n: torch.zeros_like(p) for n, p in named.items()}
        losses, tokens = [], 0
        for k in range(o["micro_batches"]):
            inputs, targets = self.batches()
            tokens += inputs.numel()
            if k == 0:
                self._update_factors(named, (inputs, targets))
            loss = self.loss.value(self.model(inputs), targets)
            for n, g in zip(named, torch.autograd.grad(loss, list(named.values()))):
                grads[n] += g / o["micro_batches"]
            losses.append(loss.detach())
        grads, mean_loss = all_reduce_mean((grads, torch.stack(losses).mean()))  # data-parallel: every shard's
        if self.steps % o["inverse_every"] == 0:
            self.eigen = {name: kronecker_eigen(self.factors[name]) for name in self.layers}
        self._apply(named, grads)
        self.steps += 1
        # a gradient step per micro-batch; the factors' forward and MC backward counted as one per sample
        return {
            "loss": float(mean_loss),
            "tokens": tokens,
            "grad_equivalents": o["micro_batches"] + o["mc_samples"],
        }

    def _update_factors(self, named: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> None:
        """Fold this step's factors into their EMA (the first step's are taken whole)."""
        o = self.options
        fresh = kfac_factors(
            self.model,
            named,
            batch,
            self.loss,
            fisher=o["fisher"],
            mc_samples=o["mc_samples"],
            seed=o["seed"] + self.steps,
        )
        fresh = all_reduce_mean({n: (f.input, f.output) for n, f in fresh.items() if n in self.layers})
        decay = o["factor_decay"] if self.factors else 0.0
        for name, bias in self.layers.items():
            a, b = fresh[name]
            old = self.factors.get(name, KroneckerFactors(a, b, bias))
            self.factors[name] = KroneckerFactors(
                decay * old.input + (1 - decay) * a, decay * old.output + (1 - decay) * b, bias
            )

    @torch.no_grad()
    def _apply(self, named: Mapping[str, Tensor], grads: dict[str, Tensor]) -> None:
        """Clip, precondition the layers, take the K-FAC step and AdamW's on the rest."""
        o = self.options
        if o["grad_clip"] is not None:
            for n, p in named.items():
                p.grad = grads[n]
            clip_gradients([list(named.values())], o["grad_clip"])
            grads = {n: p.grad for n, p in named.items()}
        for name, bias in self.layers.items():
            for n, step in kronecker_solve(grads, name, self.factors[name], self.eigen[name], o["damping"]).items():
                named[n].mul_(1 - o["lr"] * o["weight_decay"]).sub_(step, alpha=o["lr"])
        if self.adamw is not None:
            for n in self.adamw_names:
                named[n].grad = grads[n]
            self.adamw.step()
        for p in named.values():
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        """``steps``, the factors' EMA and eigendecompositions, and AdamW's state; tensors and containers only."""
        return {
            "steps": self.steps,
            "factors": {n: (f.input.clone(), f.output.clone()) for n, f in self.factors.items()},
            "eigen": {n: tuple(t.clone() for t in e) for n, e in self.eigen.items()},
            "adamw": None if self.adamw is None else self.adamw.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, so that stepping continues identically.

        Raises:
            ValueError: the saved layers differ from this optimizer's.
        """
        if set(state["factors"]) != set(self.layers) and state["factors"]:
            raise ValueError(f"state_dict holds factors of {sorted(state['factors'])}, expected {sorted(self.layers)}")
        self.steps = int(state["steps"])
        self.factors = {n: KroneckerFactors(a, b, self.layers[n]) for n, (a, b) in state["factors"].items()}
        self.eigen = {n: KroneckerEigen(*e) for n, e in state["eigen"].items()}
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])
