r"""``torch.optim.Muon`` with optax's bias-corrected Nesterov momentum as an option.

torch's Muon keeps the momentum as an EMA without bias correction, B_t = μB_{t−1} + (1 − μ)g_t, and
orthogonalizes the Nesterov update (1 − μ)g_t + μB_t (or B_t without Nesterov). The reference's Muon
(``optax.contrib.muon``, the study's inner solver and Muon baseline) corrects both terms for the bias
of the zero-initialized EMA, as Adam does, with t = 1, 2, … the step count:

    Nesterov:  U_t = μ · B_t / (1 − μ^(t+1)) + (1 − μ) · g_t / (1 − μ^t)
    plain:     U_t = B_t / (1 − μ^t)

Newton-Schulz then normalizes U_t by its Frobenius norm, so the correction changes the *mix* of
momentum and fresh gradient in the first ~1/(1 − μ) steps (at t = 1 both forms are ∝ g_1), not the
step's scale. Everything else (Newton-Schulz, shape scaling, decoupled weight decay) is torch's, except
that ``ns_dtype="float32"`` runs torch's Newton-Schulz iteration in float32, as optax does, instead of
casting to bfloat16 (:func:`newton_schulz`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from gnlib.runtime import check_choice

NS_DTYPES = ("bfloat16", "float32")


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` plus ``bias_correction`` and ``ns_dtype`` (module docstring); the same otherwise.

    Args:
        params: 2-D tensors (or param groups), as for ``torch.optim.Muon``.
        bias_correction: correct the momentum as optax's Muon does.
        ns_dtype: ``"bfloat16"`` (torch's Newton-Schulz, cast to bfloat16: fast on GPUs) or ``"float32"`` (the
            same iteration in float32, as optax runs it; on a CPU without bfloat16 matrix units it is also
            about 10x faster). With ``bias_correction=False`` and ``"bfloat16"`` this is exactly
            ``torch.optim.Muon``.
        **kwargs: ``torch.optim.Muon``'s options (lr, weight_decay, momentum, nesterov, ns_steps, ...).
    """

    def __init__(
        self, params: Any, *, bias_correction: bool = False, ns_dtype: str = "bfloat16", **kwargs: Any
    ) -> None:
        """Build torch's Muon and record ``bias_correction`` and ``ns_dtype`` in every group."""
        check_choice("ns_dtype", ns_dtype, NS_DTYPES)
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["bias_correction"], group["ns_dtype"] = bias_correction, ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step; torch's own step when no group corrects the bias or orthogonalizes in float32."""
        if not any(group.get("bias_correction") or group.get("ns_dtype") == "float32" for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            params, updates = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                    state["step"] = 0
                state["step"] += 1
                buf, t = state["momentum_buffer"], state["step"]
                buf.lerp_(p.grad, 1 - mu)
                if not group["bias_correction"]:
                    update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                elif group["nesterov"]:
                    update = buf * (mu / (1 - mu ** (t + 1))) + p.grad * ((1 - mu) / (1 - mu**t))
                else:
                    update = buf / (1 - mu**t)
                params.append(p)
                updates.append(update)
            coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
            if group["ns_dtype"] == "float32":
                updates = newton_schulz(updates, coefficients, steps, eps)
            else:
                updates = [_zeropower_via_newtonschulz(u, coefficients, steps, eps) for u in updates]
            for p, update in zip(params, updates):
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def newton_schulz(
    grads: Sequence[Tensor], ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> list[Tensor]:
    """The quintic Newton-Schulz orthogonalization of torch's Muon for matrices (m, n), in float32 or wider.

    Per matrix, X ← G/‖G‖_F (transposed when m > n), then ``ns_steps`` times X ← aX + (bA + cA²)X with
    A = XXᵀ: ``torch.optim._muon._zeropower_via_newtonschulz`` without its cast to bfloat16. Matrices of
    one (oriented) shape, dtype and device iterate together as one batch of matrix products. Returns
    each (m, n) in float32, or in its gradient's dtype when that is wider (float64), in input order.
    """
    a, b, c = ns_coefficients
    batches: dict[tuple, list[int]] = {}
    oriented = []
    for index, grad in enumerate(grads):
        x = grad.to(torch.promote_types(grad.dtype, torch.float32))
        x = x.T if grad.size(0) > grad.size(1) else x
        oriented.append(x)
        batches.setdefault((tuple(x.shape), x.dtype, x.device), []).append(index)
    results = list(grads)  # each replaced by its orthogonalized matrix below
    for indices in batches.values():
        x = torch.stack([oriented[i] for i in indices])  # (k, m, n), m <= n
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, orthogonal in zip(indices, x):
            results[i] = orthogonal.T if grads[i].size(0) > grads[i].size(1) else orthogonal
    return results
