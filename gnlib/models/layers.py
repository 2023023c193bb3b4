"""The transformer's layers in forward order, each with its hand-written tangent rule (``jvp``).

RMSNorm, rotary position embeddings, LayerNorm, causal self-attention, the SwiGLU and GELU MLPs, the
residual block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnlib.models.config import ModelConfig
from gnlib.models.tangents import (
    NO_DOTS,
    Dots,
    Slot,
    _attention_tangent,
    _plus,
    _plus_bias,
    _plus_fresh,
    _sub,
    _term,
    linear_jvp,
)


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
