"""Tangent plumbing of the transformer's forward-mode rules.

Stacked directions (:class:`Slot`), sums of tangent terms that skip zeros, the linear layer's and the
attention weights' tangents, and the head's logits tangents per slot (:class:`SlotTangents`), made one
slot at a time on access.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Slot(NamedTuple):
    """A parameter's tangent that belongs to tangent number ``index`` of a stack of tangents.

    Stacked tangents carry several directions through one forward (layerwise GN: one per block, each
    moving only its block's parameters): a tangent then has a leading axis, its slots, and a term made
    from a slotted parameter tangent adds into its own slot only (:func:`_plus`).
    """

    index: int
    tensor: Tensor


#: Tangents θ̇ of some of a module's parameters, keyed by their names relative to that module; either all
#: plain tensors (one direction) or all :class:`Slot` s (a stack of directions).
Dots = Mapping[str, Tensor | Slot]
NO_DOTS: Dots = {}


class SlotTangents(Sequence[Tensor]):
    """The output tangents of a stack of directions through a final linear layer y = xWᵀ + b, made per slot.

    Item k is slot k's ẏ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k, computed when asked for (a fresh tensor each time,
    zeros where slot k has no tangent) and not kept: a language model's logits tangents, (B, T, V) per
    slot, then exist one at a time instead of as one (S, B, T, V) stack. ``len`` is S, the highest slot
    reached plus one.
    """

    def __init__(self, x: Tensor, x_dot: Tensor | None, weight: Tensor, dots: Dots, y: Tensor) -> None:
        """Input x (..., in), its stacked tangent ẋ (S, ..., in) or None, W (out, in), ``dots``, y (..., out)."""
        self._x, self._x_dot, self._weight, self._dots, self._y = x, x_dot, weight, dots, y
        reached = [0 if x_dot is None else x_dot.shape[0]] + [slot.index + 1 for slot in dots.values()]
        self._size = max(reached)

    def __len__(self) -> int:
        """S, the number of slots."""
        return self._size

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        """Slot ``index``'s ẏ (..., out), made now."""
        if not 0 <= index < self._size:
            raise IndexError(f"slot {index} out of range for {self._size} slots")
        x_dot = None if self._x_dot is None or index >= self._x_dot.shape[0] else self._x_dot[index]
        dots = {name: slot.tensor for name, slot in self._dots.items() if slot.index == index}
        y_dot = linear_tangent(self._x, x_dot, self._weight, dots, self._y)
        return torch.zeros_like(self._y) if y_dot is None else y_dot


def _sub(dots: Dots, prefix: str) -> dict[str, Tensor | Slot]:
    """The tangents under ``prefix`` (e.g. ``"attn."``), named relative to it."""
    n = len(prefix)
    return {name[n:]: t for name, t in dots.items() if name.startswith(prefix)}


def _term(dot: Tensor | Slot | None, fn: Callable[[Tensor], Tensor]) -> Tensor | Slot | None:
    """``fn`` (linear) applied to a parameter's tangent, in the same slot."""
    if dot is None:
        return None
    return Slot(dot.index, fn(dot.tensor)) if isinstance(dot, Slot) else fn(dot)


def _plus(a: Tensor | Slot | None, b: Tensor | Slot | None) -> Tensor | None:
    """The sum a + b of two tangents, ``None`` standing for a zero one.

    Stacked tangents (leading slot axis) may hold different numbers of slots, the slots a direction has
    reached so far: the shorter counts as zero in the missing ones. A :class:`Slot` term adds into its
    slot, growing the stack as needed; a stack it adds into is updated in place (always a temporary).
    """
    if isinstance(a, Slot):
        a = _plus(None, a)
    if b is None:
        return a
    if not isinstance(b, Slot):
        if a is None:
            return b
        if a.shape[0] != b.shape[0] and a.shape[1:] == b.shape[1:]:  # stacks of different lengths
            a, b = (a, b) if a.shape[0] > b.shape[0] else (b, a)
            return torch.cat((a[: b.shape[0]] + b, a[b.shape[0] :]))
        return a + b
    index, term = b
    if a is None:
        stack = term.new_zeros((index + 1, *term.shape))
    elif a.shape[0] <= index:  # a term that broadcasts (a bias's) takes the slot shape of the stack
        shape, dtype = torch.broadcast_shapes(a.shape[1:], term.shape), torch.promote_types(a.dtype, term.dtype)
        stack = a.new_zeros((index + 1, *shape), dtype=dtype)
        stack[: a.shape[0]] = a
    else:
        stack = a
    stack[index] += term
    return stack


def _plus_fresh(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """:func:`_plus` of two temporaries: in place into ``a`` when the shapes agree (no third buffer)."""
    if a is not None and b is not None and a.shape == b.shape:
        return a.add_(b)
    return _plus(a, b)


def _times_stack(m: Tensor, t: Tensor) -> Tensor:
    """Product m @ t of a matrix batch m (..., n, k) and a tangent t (..., k, p) or a stack of them (S, ..., k, p).

    A stack is multiplied as one (..., k, S·p) matrix batch: ``m @ t`` would broadcast m, copying it S
    times (for attention weights, S × B × H × T × T numbers) before its batched product.
    """
    if t.dim() == m.dim():
        return m @ t
    slots, p = t.shape[0], t.shape[-1]
    return (m @ t.movedim(0, -2).flatten(-2)).unflatten(-1, (slots, p)).movedim(-2, 0)


def _weights_tangent_term(
    q: Tensor, k: Tensor, v: Tensor, p: Tensor, q_dot: Tensor | None, k_dot: Tensor | None
) -> Tensor | None:
    """ṗv for one direction, with ṗ = p ⊙ (ṡ − Σ p ⊙ ṡ) and ṡ = q̇kᵀ + qk̇ᵀ, p = softmax(q kᵀ + M).

    q, k, v, q̇, k̇ and the result: (B, H, T, d_head); p and ṗ: (B, H, T, T), ṗ freed on return.
    ``None`` if q̇ and k̇ are both zero (``None``).
    """
    s_dot = _plus_fresh(
        None if q_dot is None else q_dot @ k.transpose(-2, -1),
        None if k_dot is None else q @ k_dot.transpose(-2, -1),
    )
    if s_dot is None:
        return None
    p_dot = s_dot.mul_(p)
    return p_dot.addcmul_(p, p_dot.sum(-1, keepdim=True), value=-1) @ v


def _attention_tangent(
    q: Tensor, k: Tensor, v: Tensor, p: Tensor, q_dot: Tensor | None, k_dot: Tensor | None, v_dot: Tensor | None
) -> Tensor | None:
    """The tangent ṗv + pv̇ of attention's output pv, for q, k, v (B, H, T, d_head) and weights p (B, H, T, T).

    The tangents q̇, k̇, v̇ are each ``None`` (zero), one direction (B, H, T, d_head) or a stack of them
    (S, B, H, T, d_head). A stack's ṗ (B, H, T, T per slot) is made, used and freed slot by slot, so the
    step holds one such tensor, not S (at the study's T = 1024 these are a layer's largest tensors); its
    pv̇ is one product.
    """
    slots = [0 if t is None or t.dim() == q.dim() else t.shape[0] for t in (q_dot, k_dot)]
    if max(slots) == 0:  # one direction, or no q̇ and k̇
        out = _weights_tangent_term(q, k, v, p, q_dot, k_dot)
    else:
        out = None
        for index in reversed(range(max(slots))):  # the highest slot first: the stack is made once
            q_i, k_i = (t[index] if index < n else None for t, n in zip((q_dot, k_dot), slots))
            term = _weights_tangent_term(q, k, v, p, q_i, k_i)
            if term is not None:
                out = _plus(out, Slot(index, term))
    return _plus_fresh(out, None if v_dot is None else _times_stack(p, v_dot))


def _plus_bias(y_dot: Tensor | None, b_dot: Tensor | Slot | None, y: Tensor) -> Tensor | None:
    """ẏ + ḃ for an output y (..., n) and a bias tangent ḃ (n,), broadcast to y's shape when alone."""
    if b_dot is not None and y_dot is None:
        b_dot = _term(b_dot, lambda b: b.expand_as(y).clone())
    return _plus(y_dot, b_dot)


def linear_jvp(layer: nn.Linear, x: Tensor, x_dot: Tensor | None, dots: Dots) -> tuple[Tensor, Tensor | None]:
    """The layer's y = xWᵀ + b and ẏ = ẋWᵀ + xẆᵀ + ḃ for x (..., in), y (..., out); both products fill one buffer."""
    y = layer(x)
    return y, linear_tangent(x, x_dot, layer.weight, dots, y)


def linear_tangent(x: Tensor, x_dot: Tensor | None, weight: Tensor, dots: Dots, y: Tensor) -> Tensor | None:
    """ẏ = ẋWᵀ + xẆᵀ + ḃ of y = xWᵀ + b (y given, for its shape), without a graph; both products fill one buffer."""
    w_dot, b_dot = dots.get("weight"), dots.get("bias")
    with torch.no_grad():
        y_dot = None if x_dot is None else F.linear(x_dot, weight)
        fused = isinstance(w_dot, Tensor) and y_dot is not None and y_dot.dtype == x.dtype == w_dot.dtype
        if fused:  # not under autocast, which casts F.linear's operands but not an in-place addmm_'s
            y_dot.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w_dot.T)
        else:
            y_dot = _plus(y_dot, _term(w_dot, lambda w: F.linear(x, w)))
        return _plus_bias(y_dot, b_dot, y)
