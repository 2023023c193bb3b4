"""Gauss-Newton optimizers that draw their own batches, with cost accounting per step.

Full or layerwise GN, quadratic or prox-linear inner objective, first-order inner solver or Hessian-free
CG, line search (:mod:`gnlib.optim.line_search`), warm start and EMA. One outer step at the anchor θ_t:
the inner problem per block (N inner steps of Muon/AdamW/SGD on fresh batches, or CG on the damped GGN),
the merged direction, the line search, the warm start (1 − α*)Δ̂, safety on non-finite values, the EMA.
docs/architecture.md, section "One outer step of GaussNewton", states each stage, the diagnostics
:meth:`GaussNewton.step` returns, data parallelism and the pass accounting; the options are
:class:`~gnlib.optim.gn_options.GaussNewtonOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from gnlib import curvature
from gnlib.curvature.blocks import resolve_partition
from gnlib.curvature.costs import FLOP_PASS_COSTS, check_pass_costs, layerwise_pass_counts, price
from gnlib.distributed import all_reduce_mean
from gnlib.losses import CrossEntropy
from gnlib.optim.factory import EMBEDDING_AND_HEAD, clip_gradients, clip_groups, make_optimizer
from gnlib.optim.gn_options import (
    DEFAULT_DAMPING,
    DEFAULT_INNER_LR,
    GN_SCHEMA,
    GN_VARIANTS,
    SOLVER_DEFAULTS,
    VARIANT_SCHEMAS,
    GaussNewtonOptions,
    variant_options,
)
from gnlib.optim.hessian_free import backtrack, conjugate_gradient, lm_damping
from gnlib.optim.line_search import PassCount, all_finite, anchor_loss, line_search
from gnlib.optim.schedules import constant, cosine_decay
from gnlib.params import Params, flatten, unflatten
from gnlib.runtime import check_choice, invalid

Batch = tuple[Tensor, Tensor]


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class _Block:
    """One block's inner state.

    Its parameter names, the step Δ_b (leaf tensors), its inner optimizer (first-order solvers) or its
    last CG solution (flat, for the 0.95× warm start).
    """

    names: list[str]
    delta: Params
    optimizer: Any = None
    cg_x: Tensor | None = None
    clip_groups: list[list[str]] = field(default_factory=list)


@dataclass
class _Direction:
    """What the inner solve of one outer step produced (``direction`` None: a non-finite value)."""

    direction: Params | None
    q_start: float | None = None
    q_end: float | None = None
    cg_iterations: int | None = None


class GaussNewton:
    """Gauss-Newton optimizer that draws its own batches; see the module docstring for the method.

    Args:
        model: the model; its parameters are updated in place by :meth:`step`.
        batches: zero-argument callable returning the next ``(inputs, targets)`` training batch.
        **options: the fields of :class:`~gnlib.optim.gn_options.GaussNewtonOptions` (objective, blocks,
            solver, inner_steps, inner_lr, line search, EMA, ...), checked by :data:`GN_SCHEMA`.

    Raises:
        ValueError: any invalid option, naming the parameter and its allowed values, before any work.
    """

    draws_batches = True

    def __init__(self, model: nn.Module, batches: Callable[[], Batch], **options: Any) -> None:
        """Validate every option (see the class docstring), resolve the partition, build the inner states."""
        if not (isinstance(model, nn.Module) and any(True for _ in model.parameters())):
            raise invalid("GaussNewton", "model", model, "an nn.Module with parameters")
        if not callable(batches):
            raise invalid("GaussNewton", "batches", batches, "a zero-argument callable returning (inputs, targets)")
        o = self.options = GaussNewtonOptions(**GN_SCHEMA.validate(options))
        solver, inner_steps, ema, grad_clip_per = o.solver, o.inner_steps, o.ema, o.grad_clip_per
        inner_lr = DEFAULT_INNER_LR[solver] if o.inner_lr is None else o.inner_lr
        costs = check_pass_costs(FLOP_PASS_COSTS if o.pass_costs is None else o.pass_costs)
        solver_options = dict(o.solver_options or {})
        loss = CrossEntropy() if o.loss is None else o.loss
        partition = resolve_partition(o.blocks, model)

        self.model, self.batches, self.loss = model, batches, loss
        self.objective, self.solver, self.inner_steps = o.objective, solver, inner_steps
        self.inner_schedule, self.warm_start = o.inner_schedule, o.warm_start
        self.prox, self.weight_decay, self.grad_clip = float(o.prox), float(o.weight_decay), o.grad_clip
        self.weight_decay_scope, self.grad_clip_per = o.weight_decay_scope, grad_clip_per
        self.line_search = None if o.line_search is None else tuple(float(a) for a in o.line_search)
        self.line_search_batches = inner_steps if o.line_search_batches is None else o.line_search_batches
        self.line_search_accept = o.line_search_accept
        self.layerwise_slots = o.layerwise_slots
        self.ema_decay = ema
        self.damping = (DEFAULT_DAMPING if o.damping is None else float(o.damping)) if solver == "cg" else None
        self.cg_iters, self.cg_tol, self.cg_progress_tol = o.cg_iters, o.cg_tol, o.cg_progress_tol
        self.cg_backtrack = o.cg_backtrack
        self.solver_options = solver_options
        self.pass_costs = costs
        self.steps = 0
        self._layerwise_counts: dict[tuple[int, ...], tuple[float, float, float]] = {}

        named = dict(model.named_parameters())
        self.param_groups: list[dict[str, Any]] = [
            {"params": [named[n] for n in names], "block": block, "lr": float(inner_lr), "initial_lr": float(inner_lr)}
            for block, names in partition.items()
        ]
        self._blocks: dict[str, _Block] = {}
        embedding_and_head = solver_options.get("adamw_params") or EMBEDDING_AND_HEAD
        for block, names in partition.items():
            delta = {n: torch.zeros_like(named[n]).requires_grad_() for n in named if n in set(names)}
            groups = clip_groups(list(delta), embedding_and_head) if grad_clip_per == "group" else [list(delta)]
            self._blocks[block] = _Block(names=list(delta), delta=delta, clip_groups=groups)
            self._reset_inner(self._blocks[block], inner_lr)
        self.ema = None if ema is None else {n: p.detach().clone() for n, p in named.items()}
        self._ema_update = None if ema is None else get_ema_multi_avg_fn(ema)

    # ------------------------------------------------------------------------------------ public API

    def step(self) -> dict[str, Any]:
        """One outer step (module docstring); draws its batches from ``batches``; returns diagnostics."""
        cost = PassCount()
        anchor = {n: p.detach() for n, p in self.model.named_parameters()}
        damping = self.damping
        solved = self._solve_cg(anchor, cost) if self.solver == "cg" else self._solve_first_order(anchor, cost)
        ls_batches = [self._draw(cost) for _ in range(self.line_search_batches)]
        search = self._line_search(anchor, solved.direction, ls_batches, cost)

        accepted = search["reason"] is None
        if accepted:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.add_(solved.direction[name], alpha=search["alpha"])
        self._after_step(search)
        self.steps += 1
        return {
            "loss": search["loss"],
            "loss_before": search["loss_before"],
            "q_start": solved.q_start,
            "q_end": solved.q_end,
            "alpha": search["alpha"] if accepted else 0.0,
            "predicted_reduction": search["predicted_reduction"],
            "actual_reduction": search["actual_reduction"],
            "rho": search["rho"],
            "damping": damping,
            "delta_norm": search["direction_norm"] * search["alpha"] if accepted else 0.0,
            "direction_norm": search["direction_norm"],
            "rejected": 0 if accepted else 1,
            "reason": search["reason"],
            "inner_lr": search["inner_lr"],
            "cg_iterations": solved.cg_iterations,
            "forward_passes": cost.forward,
            "tangent_passes": cost.tangent,
            "backward_passes": cost.backward,
            "tokens": cost.tokens,
            "grad_equivalents": price(asdict(cost), self.pass_costs),
        }

    def eval_parameters(self) -> Params | None:
        """The EMA of the outer iterates (a params dict) when ``ema`` is set, else None (use the model)."""
        return None if self.ema is None else dict(self.ema)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`step` carries across outer steps, as tensors and primitive containers.

        Keys: ``steps``, ``param_groups`` (block, lr, initial_lr), ``blocks`` (per block: ``delta`` (the
        warm-start point Δ), ``optimizer`` (inner optimizer state, first-order solvers), ``cg_x``),
        ``ema``, ``damping``. Loadable with ``torch.load(..., weights_only=True)``. The model's parameters
        (the anchor) are saved by the caller with the model.
        """
        return {
            "steps": self.steps,
            "param_groups": [{k: g[k] for k in ("block", "lr", "initial_lr")} for g in self.param_groups],
            "blocks": {
                name: {
                    "delta": {n: t.detach().clone() for n, t in b.delta.items()},
                    "optimizer": None if b.optimizer is None else b.optimizer.state_dict(),
                    "cg_x": None if b.cg_x is None else b.cg_x.clone(),
                }
                for name, b in self._blocks.items()
            },
            "ema": None if self.ema is None else {n: t.clone() for n, t in self.ema.items()},
            "damping": self.damping,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, so that stepping continues identically.

        Raises:
            ValueError: the saved blocks, parameter names or solver kind differ from this optimizer's
                (checked before anything is changed).
        """
        saved = [g["block"] for g in state["param_groups"]]
        if saved != list(self._blocks) or list(state["blocks"]) != list(self._blocks):
            raise ValueError(f"state_dict has blocks {saved}, expected {list(self._blocks)}")
        for name, block in self._blocks.items():
            entry = state["blocks"][name]
            if list(entry["delta"]) != block.names:
                raise ValueError(f"state_dict block {name!r} holds {list(entry['delta'])}, expected {block.names}")
            if (entry["optimizer"] is None) != (self.solver == "cg"):
                raise ValueError(f"state_dict block {name!r} comes from another solver than solver={self.solver!r}")
        for (name, block), group, saved_group in zip(self._blocks.items(), self.param_groups, state["param_groups"]):
            group["lr"], group["initial_lr"] = float(saved_group["lr"]), float(saved_group["initial_lr"])
            entry = state["blocks"][name]
            with torch.no_grad():
                for n, t in block.delta.items():
                    t.copy_(entry["delta"][n])
            self._reset_inner(block, group["initial_lr"], keep_delta=True)
            if block.optimizer is not None:
                block.optimizer.load_state_dict(entry["optimizer"])
            block.cg_x = None if entry["cg_x"] is None else entry["cg_x"].to(next(iter(block.delta.values())).device)
        self.ema = None if state["ema"] is None else {n: t.clone() for n, t in state["ema"].items()}
        self.damping = state["damping"]
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        """Main settings."""
        return (
            f"GaussNewton(objective={self.objective!r}, solver={self.solver!r}, blocks={list(self._blocks)}, "
            f"inner_steps={self.inner_steps}, lr={[g['lr'] for g in self.param_groups]})"
        )

    # ------------------------------------------------------------------------------------ inner solves

    def _draw(self, cost: PassCount) -> Batch:
        batch = self.batches()
        cost.tokens += batch[1].numel()
        return batch

    def _reset_inner(self, block: _Block, lr: float, keep_delta: bool = False) -> None:
        """Cold start of a block: Δ = 0 (unless ``keep_delta``), a fresh inner optimizer, no CG memory.

        The inner optimizer is built at the nominal LR ``lr`` (the group's ``initial_lr``); each of its
        groups records ``lr_ratio`` (its LR / ``lr``, e.g. ``adamw_lr / lr`` under Muon), and every inner
        step sets its LR to ratio × the block's current peak × the inner schedule.
        """
        if not keep_delta:
            with torch.no_grad():
                for t in block.delta.values():
                    t.zero_()
        block.cg_x = None
        if self.solver == "cg":
            return
        hp = {**SOLVER_DEFAULTS[self.solver], **self.solver_options, "lr": lr, "weight_decay": 0.0}
        if self.solver == "muon":
            hp = {"adamw_lr": lr, **hp, "adamw_weight_decay": 0.0}
        block.optimizer = make_optimizer(self.solver, block.delta, **hp)
        for group in block.optimizer.param_groups:
            group["lr_ratio"] = group["lr"] / lr

    def _prox(self, delta: Params) -> tuple[Tensor, Params]:
        """P(Δ) = λ Σ_tensors mean(Δ²) and its gradient 2λΔ/numel."""
        value = sum(t.detach().square().mean() for t in delta.values()) * self.prox
        return value, {n: t.detach() * (2 * self.prox / t.numel()) for n, t in delta.items()}

    def _anchor_loss(self, anchor: Params, batch: Batch, cost: PassCount, weight: int = 1) -> float:
        return anchor_loss(self.model, self.loss, anchor, batch, cost, weight)

    def _layerwise_pass_counts(self, inputs: Tensor) -> tuple[float, float, float]:
        """Passes of one inner step of all blocks on ``inputs``, counted once per sequence shape."""
        shape = tuple(inputs.shape[1:])
        if shape not in self._layerwise_counts:
            blocks = [block.names for block in self._blocks.values()]
            self._layerwise_counts[shape] = layerwise_pass_counts(self.model, blocks, inputs, self.layerwise_slots)
        return self._layerwise_counts[shape]

    def _solve_first_order(self, anchor: Params, cost: PassCount) -> _Direction:
        """N inner steps of every block's first-order solver on shared fresh batches (Jacobi)."""
        schedule = cosine_decay(self.inner_steps) if self.inner_schedule == "cosine" else constant()
        layerwise = len(self._blocks) > 1
        q: dict[int, float] = {}
        finite = torch.ones((), dtype=torch.bool)
        for k in range(self.inner_steps):
            batch = self._draw(cost)
            multiplier = schedule(k)
            values = []
            deltas = [b.delta for b in self._blocks.values()]
            steps = curvature.layerwise_inner_steps(
                self.model, anchor, deltas, batch, self.loss, self.objective, self.layerwise_slots
            )
            forward, tangent, backward = self._layerwise_pass_counts(batch[0])
            cost.forward += forward
            cost.tangent += tangent
            cost.backward += backward
            for block, group, step in zip(self._blocks.values(), self.param_groups, steps):
                value, grad = all_reduce_mean(step)
                if self.prox:
                    penalty, prox_grad = self._prox(block.delta)
                    value = value + penalty
                    grad = {n: g + prox_grad[n] for n, g in grad.items()}
                finite = all_finite(value, *grad.values()) & finite.to(value.device)
                values.append(value.detach())
                self._inner_update(block, grad, anchor, group["lr"] * multiplier)
            if k in (0, self.inner_steps - 1):  # the loop's only host reads, one each (a nonfinite Δ is discarded)
                ok, *read = torch.stack([finite.to(values[0]), *values]).tolist()
                if not ok:
                    return _Direction(None)
                if layerwise:
                    base = self._anchor_loss(anchor, batch, cost)
                    q[k] = base + sum(v - base for v in read)
                else:
                    q[k] = read[0]
        direction = {n: t.detach().clone() for b in self._blocks.values() for n, t in b.delta.items()}
        return _Direction(self._in_model_order(direction), q[0], q[self.inner_steps - 1])

    def _inner_update(self, block: _Block, grad: Params, anchor: Params, lr: float) -> None:
        """Clip, decay θ_t + Δ, and step the block's inner optimizer at peak-scheduled ``lr``."""
        for n, t in block.delta.items():
            t.grad = grad[n].detach()
        if self.grad_clip is not None:
            clip_gradients([[block.delta[n] for n in group] for group in block.clip_groups], self.grad_clip)
        names = {id(t): n for n, t in block.delta.items()}
        with torch.no_grad():
            for group in block.optimizer.param_groups:
                group["lr"] = lr * group["lr_ratio"]
                skip = self.weight_decay_scope == "except_muon" and group.get("optimizer") == "muon"
                if self.weight_decay and not skip:
                    for t in group["params"]:
                        t.sub_(anchor[names[id(t)]] + t, alpha=group["lr"] * self.weight_decay)
        block.optimizer.step()
        block.optimizer.zero_grad(set_to_none=True)

    def _solve_cg(self, anchor: Params, cost: PassCount) -> _Direction:
        """Hessian-free: per block, CG on (G_bb + λI)x = −g_b on the N concatenated batches, backtracked."""
        parts = [self._draw(cost) for _ in range(self.inner_steps)]
        batch = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        weight = self.inner_steps
        direction: Params = {}
        change, iterations, base = 0.0, 0, None
        for block, group in zip(self._blocks.values(), self.param_groups):
            lin = curvature.linearize(self.model, anchor, batch, self.loss, wrt=block.names)
            value, gradient = all_reduce_mean((lin.value, flatten(lin.gradient)))
            cost.forward += 2 * weight
            cost.backward += weight
            base = float(value)
            if not _finite(value, gradient):
                return _Direction(None)

            def apply(x: Tensor, lin=lin) -> Tensor:
                cost.tangent += weight
                cost.backward += weight
                return all_reduce_mean(flatten(lin.ggn_vp(unflatten(x, lin.like)))) + self.damping * x

            start = 0.95 * block.cg_x if self.warm_start and block.cg_x is not None else None
            result = conjugate_gradient(
                apply, -gradient, start, max_iters=self.cg_iters, tol=self.cg_tol, progress_tol=self.cg_progress_tol
            )
            iterations += result.iterations
            if not result.finite:
                return _Direction(None)
            block.cg_x = result.x
            chosen = result.iterates[-1]
            if self.cg_backtrack and len(result.iterates) > 1:

                def loss_at(x: Tensor, like=lin.like) -> float:
                    point = {**anchor, **{n: anchor[n] + s for n, s in unflatten(x, like).items()}}
                    return self._anchor_loss(point, batch, cost, weight)

                chosen, _ = backtrack(result.iterates, loss_at)
            change += chosen.phi
            direction.update({n: s * group["lr"] for n, s in unflatten(chosen.x, lin.like).items()})
        return _Direction(self._in_model_order(direction), base, base + change, iterations)

    def _in_model_order(self, direction: Params) -> Params:
        return {n: direction[n] for n, _ in self.model.named_parameters()}

    # ------------------------------------------------------------------------------------ line search

    def _line_search(
        self, anchor: Params, direction: Params | None, batches: list[Batch], cost: PassCount
    ) -> dict[str, Any]:
        """:func:`~gnlib.optim.line_search.line_search` with this optimizer's grid, rule and objective."""
        out = line_search(
            self.model,
            self.loss,
            anchor,
            direction,
            batches,
            grid=self.line_search,
            accept=self.line_search_accept,
            objective=self.objective,
            cost=cost,
        )
        return {**out, "inner_lr": self.param_groups[0]["lr"]}

    def _after_step(self, search: dict[str, Any]) -> None:
        """Warm start, restarts, LR halving / damping update and the EMA, after the parameters moved."""
        accepted = search["reason"] is None
        if self.solver == "cg":
            self.damping = lm_damping(self.damping, search["rho"])
        elif search["reason"] == "nonfinite":
            for group in self.param_groups:
                group["lr"] *= 0.5
        for block, group in zip(self._blocks.values(), self.param_groups):
            if search["reason"] == "nonfinite" or (self.solver != "cg" and (not accepted or not self.warm_start)):
                self._reset_inner(block, group["initial_lr"])
            elif self.solver != "cg":
                with torch.no_grad():
                    for t in block.delta.values():
                        t.mul_(1.0 - search["alpha"])
        if self.ema is not None:
            with torch.no_grad():
                names = list(self.ema)
                params = dict(self.model.named_parameters())
                self._ema_update([self.ema[n] for n in names], [params[n].detach() for n in names], self.steps)


def make_gauss_newton(
    name: str, model: nn.Module, batches: Callable[[], Batch], lr: float, **hyperparameters: Any
) -> GaussNewton:
    """Build the Gauss-Newton variant ``name`` of :data:`GN_VARIANTS`.

    Args:
        name: ``"gn"`` (full GN), ``"gn_prox"`` (prox-linear), ``"gn_layerwise"`` (layerwise GN, the study's
            per-layer partition; ``blocks="per_layer_norm_with_last"`` allowed) or ``"gn_cg"`` (Hessian-free CG).
        model: the model to train.
        batches: the training batch source.
        lr: ``inner_lr``: the inner solver's peak LR; for ``"gn_cg"`` the scale of the CG step (1 = the
            damped Gauss-Newton step; the line search then shortens it).
        **hyperparameters: further :class:`GaussNewton` options (not those the variant fixes), checked by
            ``VARIANT_SCHEMAS[name]``.

    Raises:
        ValueError: unknown ``name``, unknown option, an option the variant fixes, or an invalid value.
    """
    check_choice("name", name, GN_VARIANTS)
    options = VARIANT_SCHEMAS[name].validate(variant_options(lr, hyperparameters, name))
    return GaussNewton(model, batches, **options)
