"""The models: a decoder-only transformer with hand-written forward-mode rules, its presets, toy models.

The transformer maps tokens (B, T) to logits (B, T, V): token embedding → L × [norm → causal
self-attention with rotary position embeddings → residual; norm → MLP → residual] → final RMSNorm →
linear head. Two variants, chosen by config fields (:mod:`gnlib.models.config`): LLaMA-style (SwiGLU,
RMSNorm, scaled init; presets ``tiny``, ``small``, ``llama45m``, ``llama150m``) and the study's reference
model (GELU MLP, LayerNorm with bias on queries and keys, fan-in init; ``paper_tiny``, ``paper45m``,
``paper150m``).

Every layer computes, beside its output y, the tangent ẏ = ∂y/∂x · ẋ + ∂y/∂θ · θ̇ by its own rule, without
recording a graph, so ``Transformer.forward(tokens, dots)`` returns the logits z and J·θ̇ in one pass,
skipping every zero term; a stack of directions (:class:`Slot`) carries one direction per block
(:mod:`gnlib.models.tangents`). Attention is written with batched matmuls: the fused CPU kernel has no
forward-mode derivative. Modules, in the order a forward meets them: ``config``, ``tangents``,
``layers``, ``transformer``; ``toy`` holds the teaching models.
"""

from gnlib.models.config import INIT_SCHEMES, MLP_KINDS, PRESETS, REFERENCE, ModelConfig, model_config
from gnlib.models.layers import Attention, Block, GeluMLP, LayerNorm, RMSNorm, SwiGLU, apply_rope, rope_tables
from gnlib.models.tangents import NO_DOTS, Dots, Slot, SlotTangents, linear_jvp, linear_tangent
from gnlib.models.toy import linear_model, mlp
from gnlib.models.transformer import Transformer, build_model, count_parameters

__all__ = [
    "INIT_SCHEMES",
    "MLP_KINDS",
    "NO_DOTS",
    "PRESETS",
    "REFERENCE",
    "Attention",
    "Block",
    "Dots",
    "GeluMLP",
    "LayerNorm",
    "ModelConfig",
    "RMSNorm",
    "Slot",
    "SlotTangents",
    "SwiGLU",
    "Transformer",
    "apply_rope",
    "build_model",
    "count_parameters",
    "linear_jvp",
    "linear_model",
    "linear_tangent",
    "mlp",
    "model_config",
    "rope_tables",
]
