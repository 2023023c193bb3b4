"""The transformer: embedding, residual blocks, final norm and head, with the tangent of its logits (``dots``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gnlib.models.config import ModelConfig, _replace, model_config
from gnlib.models.layers import Block, RMSNorm, rope_tables
from gnlib.models.tangents import NO_DOTS, Dots, Slot, SlotTangents, _plus, _sub, _term, linear_jvp
from gnlib.runtime import invalid, resolve_device


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
        raise invalid("", "dtype", dtype, "a floating-point torch.dtype, e.g. torch.float32 or torch.float64")
    return Transformer(config, seed=seed, dtype=dtype).to(device)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model``, shared (tied) tensors counted once."""
    return sum(p.numel() for p in model.parameters())
