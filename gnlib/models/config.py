"""The transformer's shape and initialization (:class:`ModelConfig`) and its presets by name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gnlib.runtime import check_choice, invalid, is_integer


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
                raise invalid("model", name, value, "an integer >= 1")
        for name in ("norm_eps", "rope_base", "init_std"):
            if not getattr(self, name) > 0:
                raise invalid("model", name, getattr(self, name), "a number > 0")
        check_choice("mlp", self.mlp, MLP_KINDS)
        check_choice("init", self.init, INIT_SCHEMES)
        if not isinstance(self.qk_norm, bool):
            raise invalid("model", "qk_norm", self.qk_norm, "True or False")
        if self.d_model % self.n_heads:
            raise invalid("model", "d_model", self.d_model, f"a multiple of n_heads={self.n_heads}")
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
