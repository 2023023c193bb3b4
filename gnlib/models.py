"""LLaMA-style decoder-only transformer, its presets, and toy models for teaching.

The transformer maps tokens (B, T) to logits (B, T, V):
token embedding → L × [RMSNorm → causal self-attention with rotary position embeddings (RoPE) → residual;
RMSNorm → MLP → residual] → final RMSNorm → linear head.

Two variants, chosen by config fields (the presets name them):

* LLaMA-style (``mlp="swiglu"``, ``qk_norm=False``, ``init="scaled"``): SwiGLU MLP with 3 matrices, no
  biases anywhere, N(0, 0.02²) weights with residual output projections at 0.02/√(2L). Presets ``tiny``,
  ``small``, ``llama45m``, ``llama150m``.
* The study's reference model (``mlp="gelu"``, ``qk_norm=True``, ``init="fan_in"``): MLP w2(gelu(w1 x))
  with 2 matrices; LayerNorm with bias over the full width d on queries and keys (before the heads are
  split and rotated); matrices N(0, 1/fan_in), embedding N(0, 1). Presets ``paper45m``, ``paper150m``
  (vocabulary 32000, T5's), and ``paper_tiny`` for CPUs.

Attention is written out with batched matmuls instead of ``F.scaled_dot_product_attention``: the fused
CPU kernel has no forward-mode derivative, and every Gauss-Newton product needs a Jacobian-vector
product (``torch.func.jvp`` or ``torch.autograd.forward_ad``) through the whole model.

Forward-mode rules. Every layer of the transformer computes, beside its output y, the tangent
ẏ = ∂y/∂x · ẋ + ∂y/∂θ · θ̇ for a tangent ẋ of its input and tangents θ̇ (``dots``) of some of its
parameters, written out by hand (e.g. ẏ = ẋWᵀ + xẆᵀ for y = xWᵀ) and computed without recording a graph.
``Transformer.forward(tokens, dots)`` thus returns the logits z, recorded for the backward as usual,
and J·θ̇ in one pass, which is what a Gauss-Newton product needs (:mod:`gnlib.curvature`); for a stack
of directions (:class:`Slot`) the head's products wait until a slot's logits tangent is asked for
(:class:`SlotTangents`). Against ``torch.autograd.forward_ad`` this runs no dual-tensor bookkeeping
and skips every term that is zero: a tangent that starts at layer l costs nothing below it. A missing
tangent is ``None`` (zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnlib.runtime import check_choice, is_integer, resolve_device


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and initialization of a :class:`Transformer`.

    Attributes:
        vocab_size: number of token ids V (set it from the tokenizer).
        d_model: width d of the residual stream.
        n_layers: number of transformer blocks L.
        n_heads: attention heads H; the head dimension d/H must be even (RoPE rotates pairs).
        d_ff: hidden width of the MLP.
        max_seq_len: longest sequence the model accepts (length of the RoPE tables and causal mask).
        tie_embeddings: the head reuses ``embed.weight`` (V, d) instead of its own ``head.weight``.
        norm_eps: ε in RMSNorm, x / sqrt(mean(x²) + ε) · g.
        rope_base: base b of the rotary frequencies b^(-2i/d_head), i = 0 .. d_head/2 - 1.
        init_std: σ of the normal initialization: of every weight matrix under ``init="scaled"``, of the
            embedding only under ``init="fan_in"``.
        mlp: ``"swiglu"`` (w_down(silu(w_gate x) ⊙ w_up x)) or ``"gelu"`` (w2(gelu(w1 x)), tanh-approximated
            GELU as ``jax.nn.gelu``'s default).
        qk_norm: LayerNorm with gain and bias over the full width d on q = wq x and k = wk x.
        init: ``"scaled"`` (N(0, init_std²), residual output projections N(0, init_std²/(2L))) or
            ``"fan_in"`` (matrices W (out, in) N(0, 1/in), embedding N(0, init_std²)). Norm gains are
            ones and biases zeros under both.
    """

    vocab_size: int = 256
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    init_std: float = 0.02
    mlp: str = "swiglu"
    qk_norm: bool = False
    init: str = "scaled"

    def __post_init__(self) -> None:
        """Validate the shape so that errors name the field instead of surfacing inside a matmul."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("norm_eps", "rope_base", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        check_choice("mlp", self.mlp, MLP_KINDS)
        check_choice("init", self.init, INIT_SCHEMES)
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm={self.qk_norm!r} must be True or False")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(
                f"head dimension d_model / n_heads = {self.head_dim} must be even for rotary embeddings; "
                f"change d_model={self.d_model} or n_heads={self.n_heads}"
            )

    @property
    def head_dim(self) -> int:
        """Width d/H of one attention head."""
        return self.d_model // self.n_heads

    @property
    def n_params(self) -> int:
        """Number of parameters of the model (tied embeddings counted once), without building it."""
        d = self.d_model
        mlp_matrices = 3 if self.mlp == "swiglu" else 2
        block = 4 * d * d + mlp_matrices * d * self.d_ff + 2 * d + (4 * d if self.qk_norm else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head


MLP_KINDS = ("swiglu", "gelu")
INIT_SCHEMES = ("scaled", "fan_in")
#: The study's reference architecture (docs/study.md, section "Reference configuration"): the fields that
#: differ from LLaMA's.
REFERENCE = dict(mlp="gelu", qk_norm=True, init="fan_in", init_std=1.0)

PRESETS: dict[str, ModelConfig] = {
    # CPU presets (LLaMA-style): "tiny" trains in about a minute on two cores, "small" is a larger CPU model.
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128),
    "small": ModelConfig(d_model=192, n_layers=4, n_heads=6, d_ff=768, max_seq_len=256),
    # The reference architecture at the tiny CPU shape (the CPU miniature of the study's pipeline).
    "paper_tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128, **REFERENCE),
    # The study's models: reference architecture, T5's 32k vocabulary (a tokenizer's vocab_size overrides it).
    "paper45m": ModelConfig(
        vocab_size=32000, d_model=512, n_layers=4, n_heads=8, d_ff=2048, max_seq_len=1024, **REFERENCE
    ),
    "paper150m": ModelConfig(
        vocab_size=32000, d_model=768, n_layers=12, n_heads=16, d_ff=3072, max_seq_len=1024, **REFERENCE
    ),
    # The same shapes as LLaMA-style models (SwiGLU, no QK-norm, scaled init), as gnlib built them before.
    "llama45m": ModelConfig(vocab_size=32000, d_model=512, n_layers=4, n_heads=8, d_ff=2048, max_seq_len=1024),
    "llama150m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=16, d_ff=3072, max_seq_len=1024),
}


def model_config(preset: str, **overrides) -> ModelConfig:
    """The config of ``preset`` with some fields replaced, e.g. ``model_config("tiny", vocab_size=512)``.

    Raises:
        ValueError: unknown preset, unknown field name, or an invalid resulting shape.
    """
    check_choice("preset", preset, PRESETS)
    return _replace(PRESETS[preset], overrides)


def _replace(config: ModelConfig, overrides: dict) -> ModelConfig:
    """``config`` with ``overrides`` applied, rejecting names that are not fields of ModelConfig."""
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in overrides:
        if key not in fields:
            raise ValueError(f"{key!r} is not a ModelConfig field; allowed overrides: {fields}")
    return dataclasses.replace(config, **overrides)


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


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x², last axis) + ε) · g, with a learned gain g of shape (d,)."""

    def __init__(self, dim: int, eps: float) -> None:
        """Create the gain ``weight``, ones."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (..., d) over its last axis."""
        return self.jvp(x, None, NO_DOTS)[0]

    def jvp(self, x: Tensor, x_dot: Tensor | None, dots: Dots) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (..., d): with n = x r, r = (mean(x²) + ε)^(-1/2), ṅ = r (ẋ − n · mean(n ẋ)), ẏ = ṅ g + n ġ."""
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        n = x * r
        with torch.no_grad():
            n_dot = None if x_dot is None else (x_dot - n * (n * x_dot).mean(-1, keepdim=True)).mul_(r)
            y_dot = _norm_tangent(n, n_dot, self.weight, dots.get("weight"), dots.get("bias"))
        return n * self.weight, y_dot


def _norm_tangent(
    n: Tensor, n_dot: Tensor | None, g: Tensor, g_dot: Tensor | Slot | None, b_dot: Tensor | Slot | None
) -> Tensor | None:
    """Tangent of y = n g (+ b) from the tangents of the normalized n, the gain g and the bias b."""
    return _plus_bias(_plus(None if n_dot is None else n_dot.mul_(g), _term(g_dot, lambda t: n * t)), b_dot, n)


def rope_tables(config: ModelConfig) -> tuple[Tensor, Tensor]:
    """Rotary tables (cos, sin), each (max_seq_len, d_head), in float64, laid out for :func:`apply_rope`.

    Position t rotates the pair (x_i, x_{i+h}), h = d_head/2, by the angle t · b^(-i/h):
    cos = [cos θ, cos θ], sin = [-sin θ, sin θ] along the last axis.
    """
    half = config.head_dim // 2
    freq = config.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), freq)
    return angles.cos().repeat(1, 2), torch.cat((-angles.sin(), angles.sin()), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+h}) of x (B, H, T, d_head): x·cos + roll(x, h)·sin with (T, d_head) tables.

    The result is (x_i cos θ_i − x_{i+h} sin θ_i, x_{i+h} cos θ_i + x_i sin θ_i). Few whole-tensor ops on
    purpose: under forward-mode AD every op that mixes a dual tensor with a constant has a fixed overhead.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class LayerNorm(nn.Module):
    """y = (x − mean(x)) / sqrt(var(x) + ε) · g + b over the last axis, gain g ones and bias b zeros, (d,) each.

    Written out (not ``F.layer_norm``) so that its forward-mode derivative is plain elementwise algebra.
    """

    def __init__(self, dim: int, eps: float) -> None:
        """Create ``weight`` (ones) and ``bias`` (zeros)."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize x (..., d) over its last axis (biased variance, as ``nn.LayerNorm``)."""
        return self.jvp(x, None, NO_DOTS)[0]

    def jvp(self, x: Tensor, x_dot: Tensor | None, dots: Dots) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (..., d): with c = x − mean(x), n = c r, ċ = ẋ − mean(ẋ), ṅ = r (ċ − n · mean(n ċ))."""
        centered = x - x.mean(-1, keepdim=True)
        r = torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + self.eps)
        n = centered * r
        with torch.no_grad():
            n_dot = None
            if x_dot is not None:
                c_dot = x_dot - x_dot.mean(-1, keepdim=True)
                n_dot = c_dot.sub_(n * (n * c_dot).mean(-1, keepdim=True)).mul_(r)
            y_dot = _norm_tangent(n, n_dot, self.weight, dots.get("weight"), dots.get("bias"))
        return n * self.weight + self.bias, y_dot


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE on queries and keys (optionally LayerNorm-ed first).

    softmax(q kᵀ / sqrt(d_head) + M) v per head, M = -inf above the diagonal, heads concatenated, then wo.
    With ``qk_norm``, q = LN_q(wq x) and k = LN_k(wk x), each LayerNorm over the full width d, before the
    heads are split and RoPE is applied (the reference model's order).
    """

    def __init__(self, config: ModelConfig) -> None:
        """Create wq, wk, wv, wo, each (d, d), and q_norm, k_norm when ``config.qk_norm``."""
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        if config.qk_norm:
            self.q_norm = LayerNorm(d, config.norm_eps)
            self.k_norm = LayerNorm(d, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """Attend over x (B, T, d) with RoPE tables cos, sin (T, d_head) and additive causal mask (T, T)."""
        return self.jvp(x, None, NO_DOTS, cos, sin, mask)[0]

    def jvp(
        self, x: Tensor, x_dot: Tensor | None, dots: Dots, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (B, T, d): with s = q kᵀ and p = softmax(s + M), ṡ = q̇ kᵀ + q k̇ᵀ and ṗ = p ⊙ (ṡ − Σ p ⊙ ṡ)."""
        B, T, d = x.shape
        (q, q_dot), (k, k_dot), (v, v_dot) = (
            linear_jvp(layer, x, x_dot, _sub(dots, f"{name}."))
            for name, layer in (("wq", self.wq), ("wk", self.wk), ("wv", self.wv))
        )
        if self.qk_norm:
            q, q_dot = self.q_norm.jvp(q, q_dot, _sub(dots, "q_norm."))
            k, k_dot = self.k_norm.jvp(k, k_dot, _sub(dots, "k_norm."))

        def heads(t: Tensor | None) -> Tensor | None:  # (..., B, T, d) -> (..., B, H, T, d_head)
            return None if t is None else t.view(*t.shape[:-1], self.n_heads, -1).transpose(-3, -2)

        q, q_dot, k, k_dot, v, v_dot = map(heads, (q, q_dot, k, k_dot, v, v_dot))
        scale = q.shape[-1] ** -0.5  # folded into the (small, constant) tables of q
        q_tables, k_tables = (cos * scale, sin * scale), (cos, sin)
        q, k = apply_rope(q, *q_tables), apply_rope(k, *k_tables)
        with torch.no_grad():  # RoPE is linear: tangents rotate alike
            q_dot = None if q_dot is None else apply_rope(q_dot, *q_tables)
            k_dot = None if k_dot is None else apply_rope(k_dot, *k_tables)
        weights = torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1)  # (B, H, T, T)
        out = weights @ v
        with torch.no_grad():
            out_dot = _attention_tangent(q, k, v, weights, q_dot, k_dot, v_dot)
            out_dot = None if out_dot is None else out_dot.transpose(-3, -2).flatten(-2)  # (..., B, T, d)
        return linear_jvp(self.wo, out.transpose(1, 2).reshape(B, T, d), out_dot, _sub(dots, "wo."))


class SwiGLU(nn.Module):
    """w_down(silu(w_gate x) ⊙ w_up x), hidden width d_ff."""

    def __init__(self, config: ModelConfig) -> None:
        """Create w_gate, w_up (d_ff, d) and w_down (d, d_ff)."""
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map x (..., d) to (..., d)."""
        return self.jvp(x, None, NO_DOTS)[0]

    def jvp(self, x: Tensor, x_dot: Tensor | None, dots: Dots) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (..., d): h = silu(a) ⊙ b has ḣ = silu'(a) ⊙ ȧ ⊙ b + silu(a) ⊙ ḃ."""
        a, a_dot = linear_jvp(self.w_gate, x, x_dot, _sub(dots, "w_gate."))
        b, b_dot = linear_jvp(self.w_up, x, x_dot, _sub(dots, "w_up."))
        silu = F.silu(a)
        with torch.no_grad():  # silu_backward(ȧ, a) = silu'(a) ⊙ ȧ
            h_dot = _plus_fresh(
                None if a_dot is None else torch.ops.aten.silu_backward(a_dot, a).mul_(b),
                None if b_dot is None else silu * b_dot,
            )
        return linear_jvp(self.w_down, silu * b, h_dot, _sub(dots, "w_down."))


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)), hidden width d_ff, tanh-approximated GELU (the reference model's MLP)."""

    def __init__(self, config: ModelConfig) -> None:
        """Create w1 (d_ff, d) and w2 (d, d_ff)."""
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Map x (..., d) to (..., d)."""
        return self.jvp(x, None, NO_DOTS)[0]

    def jvp(self, x: Tensor, x_dot: Tensor | None, dots: Dots) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (..., d): h = gelu(a) has ḣ = gelu'(a) ⊙ ȧ."""
        a, a_dot = linear_jvp(self.w1, x, x_dot, _sub(dots, "w1."))
        with torch.no_grad():  # gelu_backward(ȧ, a) = gelu'(a) ⊙ ȧ
            h_dot = None if a_dot is None else torch.ops.aten.gelu_backward(a_dot, a, approximate="tanh")
        return linear_jvp(self.w2, F.gelu(a, approximate="tanh"), h_dot, _sub(dots, "w2."))


_MLPS: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        """Create attn_norm, attn, mlp_norm, mlp (SwiGLU or GELU, ``config.mlp``)."""
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = _MLPS[config.mlp](config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        """Map x (B, T, d) to (B, T, d)."""
        return self.jvp(x, None, NO_DOTS, cos, sin, mask)[0]

    def jvp(
        self, x: Tensor, x_dot: Tensor | None, dots: Dots, cos: Tensor, sin: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """(y, ẏ) for x (B, T, d); the residual adds the tangents."""
        h, h_dot = self.attn_norm.jvp(x, x_dot, _sub(dots, "attn_norm."))
        a, a_dot = self.attn.jvp(h, h_dot, _sub(dots, "attn."), cos, sin, mask)
        x = x + a
        with torch.no_grad():
            x_dot = _plus(x_dot, a_dot)
        h, h_dot = self.mlp_norm.jvp(x, x_dot, _sub(dots, "mlp_norm."))
        m, m_dot = self.mlp.jvp(h, h_dot, _sub(dots, "mlp."))
        with torch.no_grad():
            x_dot = _plus(x_dot, m_dot)
        return x + m, x_dot


class Transformer(nn.Module):
    """LLaMA-style decoder: tokens (B, T) → logits (B, T, vocab_size).

    Parameter names: ``embed.weight``; ``blocks.{i}.attn_norm.weight``, ``blocks.{i}.attn.w{q,k,v,o}.weight``
    (with ``qk_norm``: then ``blocks.{i}.attn.{q,k}_norm.{weight,bias}``), ``blocks.{i}.mlp_norm.weight``,
    ``blocks.{i}.mlp.w_{gate,up,down}.weight`` (SwiGLU) or ``blocks.{i}.mlp.w{1,2}.weight`` (GELU);
    ``norm.weight``; ``head.weight`` (absent when ``tie_embeddings``: the head then uses ``embed.weight``).

    The RoPE tables and the additive causal mask are non-persistent buffers: they follow
    ``.to(device, dtype)`` and stay out of ``state_dict``. They are computed in float64 and rounded to the
    construction dtype, so pass ``dtype`` at construction (``build_model(..., dtype=torch.float64)``) for
    tables exact in float64 rather than float32 values cast up.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0, dtype: torch.dtype | None = None) -> None:
        """Build the model on the CPU in ``dtype`` (default: torch's), initialized from ``seed``."""
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):  # layer constructors draw from the global RNG: leave it untouched
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.d_model, config.norm_eps)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights(seed)
        cos, sin = rope_tables(config)
        mask = torch.full((config.max_seq_len, config.max_seq_len), -math.inf, dtype=torch.float64).triu(1)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.to(torch.get_default_dtype() if dtype is None else dtype)  # float64 tables rounded once, to dtype

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """Fill the parameters from a local generator seeded with ``seed`` (the global RNG is untouched).

        Weight matrices are drawn in ``named_parameters()`` order. ``init="scaled"``: N(0, σ²), σ = init_std,
        and σ/sqrt(2L) for the residual output projections ``attn.wo``, ``mlp.w_down`` and ``mlp.w2`` as in
        GPT-2. ``init="fan_in"``: the embedding N(0, σ²), every other matrix W (out, in) N(0, 1/in). Norm
        gains are ones, biases zeros. Runs on the CPU before the cast to the model's dtype, so a seed gives
        the same weights on every device and in every dtype (up to rounding).
        """
        generator = torch.Generator().manual_seed(seed)
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(0.0 if name.endswith(".bias") else 1.0)
            elif self.config.init == "fan_in":
                p.normal_(0.0, std if name == "embed.weight" else p.shape[1] ** -0.5, generator=generator)
            elif name.endswith(("attn.wo.weight", "mlp.w_down.weight", "mlp.w2.weight")):
                p.normal_(0.0, residual_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    #: ``forward(tokens, dots)`` also returns J·θ̇ (see the module docstring); :mod:`gnlib.curvature` uses it.
    computes_jvp = True

    def forward(self, tokens: Tensor, dots: Dots | None = None) -> Tensor | tuple[Tensor, Tensor | None]:
        """Logits (B, T, V) for token ids (B, T), T ≤ max_seq_len; position t sees tokens 0..t only.

        Args:
            tokens: token ids (B, T).
            dots: tangents θ̇ of some parameters, by their names in ``named_parameters()`` (the tied
                head uses ``embed.weight``'s). With them the result is ``(z, J·θ̇)``: the logits and their
                directional derivative (B, T, V), or ``None`` where no tangent reaches the logits. With
                :class:`Slot` s, a stack of directions: J·θ̇ is a :class:`SlotTangents`, item k (B, T, V)
                the derivative along the tangents in slot k, made when asked for (S = ``len``, the highest
                slot reached, plus one).

        Raises:
            ValueError: ``tokens`` is not 2-D or longer than ``max_seq_len``, or ``dots`` names a tensor
                that is not a parameter.
        """
        if dots:
            names = [name for name, _ in self.named_parameters()]
            unknown = sorted(set(dots) - set(names))
            if unknown:
                raise ValueError(
                    f"dots names {unknown}, which are not parameters; allowed: names from named_parameters(), "
                    f"e.g. {names[:2]}"
                )
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (batch, seq_len), got {tuple(tokens.shape)}")
        T = tokens.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"tokens has seq_len={T} > max_seq_len={self.config.max_seq_len} of this model")
        cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], self.causal_mask[:T, :T]
        given = NO_DOTS if dots is None else dots
        x = self.embed(tokens)
        with torch.no_grad():
            x_dot = _plus(None, _term(given.get("embed.weight"), lambda e: F.embedding(tokens, e)))
        for i, block in enumerate(self.blocks):
            x, x_dot = block.jvp(x, x_dot, _sub(given, f"blocks.{i}."), cos, sin, mask)
        x, x_dot = self.norm.jvp(x, x_dot, _sub(given, "norm."))
        head = _sub(given, "embed." if self.config.tie_embeddings else "head.")
        if any(isinstance(t, Slot) for t in given.values()):
            z = self.head(x)
            return z, SlotTangents(x, x_dot, self.head.weight, head, z)
        z, z_dot = linear_jvp(self.head, x, x_dot, head)
        return z if dots is None else (z, z_dot)


def build_model(
    preset_or_config: str | ModelConfig,
    *,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Transformer:
    """A :class:`Transformer` from a preset name or a config, optionally overriding config fields.

    Example: ``build_model("tiny", vocab_size=corpus.vocab_size, seed=1, dtype=torch.float64)``.

    Raises:
        ValueError: unknown preset or override, invalid shape, unavailable device, or non-floating dtype.
    """
    config = model_config(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    config = _replace(config, overrides)
    device = resolve_device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} must be a floating-point torch.dtype, e.g. torch.float32 or torch.float64")
    return Transformer(config, seed=seed, dtype=dtype).to(device)


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def linear_model(d_in: int, d_out: int, bias: bool = True, *, seed: int = 0) -> nn.Linear:
    """Affine map z = W x + b on inputs (N, d_in): linear or (with cross-entropy) logistic regression.

    PyTorch's default initialization, drawn from ``seed`` without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(d_in, d_out, bias=bias)


def mlp(sizes: list[int], activation: str = "tanh", *, seed: int = 0) -> nn.Sequential:
    """Multilayer perceptron sizes[0] → sizes[1] → … → sizes[-1] with ``activation`` between linear layers.

    Linear layers sit at indices 0, 2, 4, … of the Sequential; no activation after the last one.

    Raises:
        ValueError: fewer than two sizes, or an unknown ``activation`` (allowed: tanh, relu, gelu, silu, sigmoid).
    """
    check_choice("activation", activation, _ACTIVATIONS)
    if len(sizes) < 2:
        raise ValueError(f"sizes={sizes!r} must list at least an input and an output width")
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())
