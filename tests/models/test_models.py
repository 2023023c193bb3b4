"""Tests for gnlib.models: shapes, presets, causality, tied weights, forward-mode AD, determinism, errors."""

import dataclasses

import oracles
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, jvp, vjp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gnlib.models import (
    PRESETS,
    REFERENCE,
    LayerNorm,
    ModelConfig,
    RMSNorm,
    Slot,
    SlotTangents,
    apply_rope,
    build_model,
    count_parameters,
    linear_model,
    mlp,
    model_config,
    rope_tables,
)
from gnlib.params import params_of

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A model small enough for float64 finite differences, with a large init so that it is far from linear.
MICRO = dict(vocab_size=11, d_model=8, n_layers=2, n_heads=2, d_ff=12, max_seq_len=6, init_std=0.5)
# The two architectures: LLaMA-style (the config defaults) and the study's reference model.
VARIANTS = {"llama": {}, "reference": dict(mlp="gelu", qk_norm=True, init="fan_in")}


def tokens(batch: int, seq_len: int, vocab: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)


def expected_names(n_layers: int, tied: bool, reference: bool = False) -> list[str]:
    names = ["embed.weight"]
    for i in range(n_layers):
        names += [f"blocks.{i}.attn_norm.weight"]
        names += [f"blocks.{i}.attn.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        if reference:
            names += [f"blocks.{i}.attn.{n}_norm.{w}" for n in "qk" for w in ("weight", "bias")]
        names += [f"blocks.{i}.mlp_norm.weight"]
        names += [f"blocks.{i}.mlp.{w}.weight" for w in (("w1", "w2") if reference else ("w_gate", "w_up", "w_down"))]
    return names + ["norm.weight"] + ([] if tied else ["head.weight"])


def random_tangent(params: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for n, p in params.items()}


# ---------------------------------------------------------------- configs and presets


def test_preset_shapes_match_the_study():
    for prefix in ("paper", "llama"):
        assert dataclasses.astuple(model_config(f"{prefix}45m"))[:6] == (32000, 512, 4, 8, 2048, 1024)
        assert dataclasses.astuple(model_config(f"{prefix}150m"))[:6] == (32000, 768, 12, 16, 3072, 1024)
    assert set(PRESETS) == {"tiny", "small", "paper_tiny", "paper45m", "paper150m", "llama45m", "llama150m"}


@pytest.mark.parametrize("preset", ["paper45m", "paper150m", "paper_tiny"])
def test_paper_presets_are_the_reference_architecture(preset):
    """The reference model of docs/study.md, section "Reference configuration".

    GELU MLP, QK-LayerNorm, fan-in init with embedding std 1, eps 1e-6, θ 1e4, untied.
    """
    config = model_config(preset)
    assert (config.mlp, config.qk_norm, config.init, config.init_std) == ("gelu", True, "fan_in", 1.0)
    assert (config.norm_eps, config.rope_base, config.tie_embeddings) == (1e-6, 1e4, False)
    assert {k: getattr(config, k) for k in REFERENCE} == REFERENCE
    for llama in ("tiny", "small", "llama45m", "llama150m"):
        assert (model_config(llama).mlp, model_config(llama).qk_norm, model_config(llama).init) == (
            "swiglu",
            False,
            "scaled",
        )


def test_paper_parameter_counts_by_hand():
    """paper45m ≈ 45M and paper150m ≈ 134M with the 32k vocabulary (2 MLP matrices, 4d of QK-norm per block)."""
    for preset, d, L, ff, total in (("paper45m", 512, 4, 2048, 45_363_712), ("paper150m", 768, 12, 3072, 134_142_720)):
        block = 4 * d * d + 2 * d * ff + 2 * d + 4 * d
        assert model_config(preset).n_params == L * block + d + 2 * 32000 * d == total
    assert count_parameters(build_model("paper45m")) == 45_363_712


@pytest.mark.parametrize(("preset", "low", "high"), [("tiny", 1e5, 3e5), ("small", 1e6, 3e6)])
def test_cpu_preset_parameter_counts(preset, low, high):
    model = build_model(preset)
    assert low <= count_parameters(model) <= high
    assert count_parameters(model) == model.config.n_params


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_formula_matches_built_models(tie, variant):
    paper45m = model_config("paper45m", vocab_size=300, tie_embeddings=tie, **VARIANTS[variant])
    for config in (ModelConfig(**MICRO, tie_embeddings=tie, **VARIANTS[variant]), paper45m):
        assert config.n_params == count_parameters(build_model(config))
    # llama150m by hand: per block 4·768² + 3·768·3072 + 2·768; embedding and head 768·V each; final norm 768
    block = 4 * 768**2 + 3 * 768 * 3072 + 2 * 768
    V = 32100
    assert model_config("llama150m", vocab_size=V, tie_embeddings=tie).n_params == (
        12 * block + 768 + V * 768 * (1 if tie else 2)
    )


def test_model_config_overrides_and_errors():
    assert model_config("tiny", vocab_size=512).vocab_size == 512
    assert PRESETS["tiny"].vocab_size == 256  # presets are not mutated
    with pytest.raises(ValueError, match="preset.*tiny"):
        model_config("huge")
    with pytest.raises(ValueError, match="d_modle.*d_model"):
        model_config("tiny", d_modle=32)
    with pytest.raises(ValueError, match="n_heads"):
        model_config("tiny", n_heads=3)
    with pytest.raises(ValueError, match="even"):
        model_config("tiny", d_model=60, n_heads=4)  # head dim 15
    with pytest.raises(ValueError, match="n_layers"):
        model_config("tiny", n_layers=0)
    with pytest.raises(ValueError, match="d_modle"):
        build_model("tiny", d_modle=32)
    with pytest.raises(ValueError, match="dtype"):
        build_model("tiny", dtype=torch.int64)
    with pytest.raises(ValueError, match="mlp='relu'.*swiglu.*gelu"):
        model_config("tiny", mlp="relu")
    with pytest.raises(ValueError, match="init='xavier'.*scaled.*fan_in"):
        model_config("tiny", init="xavier")
    with pytest.raises(ValueError, match="qk_norm"):
        model_config("tiny", qk_norm="yes")


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize("preset", ["tiny", "paper_tiny"])
def test_output_shape_and_parameter_names(preset):
    model = build_model(preset, vocab_size=50)
    reference = preset == "paper_tiny"
    assert model(tokens(3, 17, 50)).shape == (3, 17, 50)
    assert [n for n, _ in model.named_parameters()] == expected_names(2, tied=False, reference=reference)
    biases = [n for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases == ([f"blocks.{i}.attn.{q}_norm.bias" for i in range(2) for q in "qk"] if reference else [])
    assert all(p.dim() == 2 or "norm" in n for n, p in model.named_parameters())
    assert list(model.state_dict()) == expected_names(2, tied=False, reference=reference)  # no RoPE tables, mask


def test_reference_block_math():
    """One reference block written from the formulas: q, k LayerNorm-ed over d before RoPE; w2(gelu_tanh(w1 x))."""
    model = build_model(ModelConfig(**MICRO, **VARIANTS["reference"]), dtype=torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # non-trivial gains and biases
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    block, T = model.blocks[0], 5
    x = torch.randn(2, T, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def layer_norm(v, norm):
        return F.layer_norm(v, (8,), norm.weight, norm.bias, eps=1e-6)

    def rms(v, norm):
        return v / (v.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight

    a = block.attn
    h = rms(x, block.attn_norm)
    q, k, v = layer_norm(h @ a.wq.weight.T, a.q_norm), layer_norm(h @ a.wk.weight.T, a.k_norm), h @ a.wv.weight.T
    heads = lambda t: t.view(2, T, 2, 4).transpose(1, 2)  # noqa: E731
    cos, sin, mask = tables(model, T)
    q, k, v = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
    attn = torch.softmax(q @ k.transpose(-2, -1) / 2.0 + mask, -1) @ v
    x1 = x + attn.transpose(1, 2).reshape(2, T, 8) @ a.wo.weight.T
    u = rms(x1, block.mlp_norm) @ block.mlp.w1.weight.T
    gelu = 0.5 * u * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (u + 0.044715 * u**3)))
    torch.testing.assert_close(block(x, cos, sin, mask), x1 + gelu @ block.mlp.w2.weight.T)


def test_layer_norm_math():
    norm = LayerNorm(5, eps=0.0).double()
    with torch.no_grad():
        norm.weight.fill_(2.0)
        norm.bias.fill_(0.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = 2 * (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True) + 0.5
    torch.testing.assert_close(norm(x), expected)


def test_sequence_errors():
    model = build_model("tiny")
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(tokens(1, 129, 256))
    with pytest.raises(ValueError, match="shape"):
        model(tokens(1, 8, 256)[0])


def test_tied_embeddings_share_one_tensor():
    model = build_model("tiny", tie_embeddings=True)
    assert model.head.weight is model.embed.weight
    assert [n for n, _ in model.named_parameters()] == expected_names(2, tied=True)
    assert list(params_of(model)) == expected_names(2, tied=True)
    x = tokens(2, 5, 256)
    h = model.norm(model.blocks[1](model.blocks[0](model.embed(x), *tables(model, 5)), *tables(model, 5)))
    torch.testing.assert_close(model(x), h @ model.embed.weight.T)


def tables(model, T):
    return model.rope_cos[:T], model.rope_sin[:T], model.causal_mask[:T, :T]


def test_causality():
    model = build_model(ModelConfig(**MICRO), dtype=torch.float64)
    x = tokens(2, 6, 11)
    y = x.clone()
    y[:, 3:] = (y[:, 3:] + 1) % 11
    zx, zy = model(x), model(y)
    torch.testing.assert_close(zx[:, :3], zy[:, :3], rtol=0, atol=0)
    assert (zx[:, 3:] - zy[:, 3:]).abs().amax(-1).min() > 1e-6


def test_rms_norm_math():
    norm = RMSNorm(5, eps=0.0)
    with torch.no_grad():
        norm.weight.fill_(2.0)
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), 2 * x / x.pow(2).mean(-1, keepdim=True).sqrt())


def test_rope_is_a_complex_rotation_of_each_pair():
    config = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=8, max_seq_len=12, rope_base=100.0)
    cos, sin = rope_tables(config)
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    theta = torch.arange(12, dtype=torch.float64)[:, None] * 100.0 ** (-torch.arange(4) / 4)  # (T, h)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones_like(theta), theta)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.cat((z.real, z.imag), dim=-1))


def test_rope_scores_depend_on_relative_position_only():
    config = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=8, max_seq_len=12)
    cos, sin = rope_tables(config)
    q, k = torch.randn(2, 8, dtype=torch.float64)
    rotated = lambda v, t: apply_rope(v.expand(1, 1, 1, 8), cos[t : t + 1], sin[t : t + 1]).flatten()  # noqa: E731
    score = lambda m, n: rotated(q, m) @ rotated(k, n)  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(9, 6))
    torch.testing.assert_close(rotated(q, 7).norm(), q.norm())
    assert not torch.allclose(score(5, 2), score(5, 3))


# ---------------------------------------------------------------- functional use and forward-mode AD


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tie", [False, True])
def test_functional_call_uses_the_params_dict(tie, variant):
    model = build_model(ModelConfig(**MICRO, tie_embeddings=tie, **VARIANTS[variant]), dtype=torch.float64)
    x = tokens(2, 6, 11)
    params = params_of(model)
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x), rtol=0, atol=0)
    moved = {n: p + 0.1 * t for (n, p), t in zip(params.items(), random_tangent(params).values())}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(moved[n])  # tied: moving embed.weight moves the head too
    torch.testing.assert_close(functional_call(build_model(model.config, dtype=torch.float64), moved, (x,)), model(x))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tie", [False, True])
def test_jvp_matches_central_finite_difference(tie, device, variant):
    config = ModelConfig(**MICRO, tie_embeddings=tie, **VARIANTS[variant])
    model = build_model(config, dtype=torch.float64, device=device)
    x = tokens(3, 6, 11, device=device)
    params = params_of(model)
    v = random_tangent(params)
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    _, jv_func = jvp(f, (params,), (v,))
    with fwAD.dual_level():
        _, jv_dual = fwAD.unpack_dual(f({n: fwAD.make_dual(p, v[n]) for n, p in params.items()}))
    eps = 1e-6  # truncation error O(eps²) and rounding O(1e-16 / eps) both stay near 1e-8 relative
    fd = (f({n: p + eps * v[n] for n, p in params.items()}) - f({n: p - eps * v[n] for n, p in params.items()})) / (
        2 * eps
    )
    scale = jv_func.abs().max().item()
    assert scale > 1.0  # a tangent that moves the logits, so the comparison is meaningful
    torch.testing.assert_close(jv_func, fd, rtol=1e-6, atol=1e-8 * scale)
    torch.testing.assert_close(jv_dual, fd, rtol=1e-6, atol=1e-8 * scale)
    torch.testing.assert_close(jv_dual, jv_func, rtol=1e-12, atol=1e-12)
    z_rules, jv_rules = model(x, dots=v)  # the model's hand-written forward-mode rules
    torch.testing.assert_close(z_rules, f(params), rtol=0, atol=0)
    torch.testing.assert_close(jv_rules, fd, rtol=1e-6, atol=1e-8 * scale)
    torch.testing.assert_close(jv_rules, jv_func, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(
    "names",
    [
        ["embed.weight"],
        ["blocks.1.attn.wk.weight", "blocks.1.mlp_norm.weight"],
        ["blocks.0.attn_norm.weight", "blocks.0.attn.wq.weight", "blocks.0.attn.wv.weight", "blocks.1.mlp.w_up.weight"],
        ["norm.weight"],
        ["blocks.0.attn.q_norm.bias"],
    ],
    ids=["embedding", "one-layer-subset", "two-layers", "final-norm", "bias-alone"],
)
def test_forward_rules_for_a_subset_of_parameters(names, tie, variant):
    """J_S v_S for a subset S of the parameters (a layerwise block), the rest fixed; gains and biases not trivial."""
    model = build_model(ModelConfig(**MICRO, tie_embeddings=tie, **VARIANTS[variant]), dtype=torch.float64)
    params = params_of(model)
    with torch.no_grad():
        for name, p in params.items():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype))
    rename = (
        {"blocks.1.mlp.w_up.weight": "blocks.1.mlp.w1.weight"}
        if variant == "reference"
        else {"blocks.0.attn.q_norm.bias": "blocks.0.attn_norm.weight"}  # no biases in the LLaMA variant
    )
    names = [rename.get(name, name) for name in names]
    x = tokens(3, 6, 11)
    v = {name: t for name, t in random_tangent(params).items() if name in names}
    assert list(v) == names
    reference = oracles.subset_jvp(model, params, x, v)
    z, jv = functional_call(model, params, (x,), {"dots": v})
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(z, functional_call(model, params, (x,)), rtol=0, atol=0)
    torch.testing.assert_close(jv, reference, rtol=1e-12, atol=1e-12)
    assert model(x, dots={})[1] is None  # no tangent: J·0, returned as None
    with pytest.raises(ValueError, match=r"dots names \['blocks.0.attn.wq'\], which are not parameters; allowed"):
        model(x, dots={"blocks.0.attn.wq": torch.zeros(1)})  # a module's name, not its weight's


@pytest.mark.parametrize("preset", ["tiny", "paper_tiny"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_through_a_dual_forward_gives_the_plain_gradient(device, preset):
    """The GN hot path: one dual forward that also records the reverse graph, then one backward."""
    model = build_model(preset, vocab_size=11, device=device, dtype=torch.float64)
    x, y = tokens(2, 16, 11, device=device), tokens(2, 16, 11, seed=1, device=device)
    params = params_of(model, requires_grad=True)
    v = random_tangent(params)
    with fwAD.dual_level():
        z, jv = fwAD.unpack_dual(functional_call(model, {n: fwAD.make_dual(p, v[n]) for n, p in params.items()}, (x,)))
    grads = torch.autograd.grad(F.cross_entropy(z.flatten(0, 1), y.flatten()), list(params.values()))
    plain = torch.autograd.grad(F.cross_entropy(model(x).flatten(0, 1), y.flatten()), list(model.parameters()))
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(jv, jvp(lambda p: functional_call(model, p, (x,)), (params,), (v,))[1])
    z, jv_rules = functional_call(model, params, (x,), {"dots": v})  # the same with the model's own rules
    grads = torch.autograd.grad(F.cross_entropy(z.flatten(0, 1), y.flatten()), list(params.values()))
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(jv_rules, jv)
    assert not jv_rules.requires_grad  # the tangent arithmetic records no graph


@pytest.mark.parametrize("variant", VARIANTS)
def test_reverse_mode_is_the_adjoint_and_second_order_modes_agree(variant):
    """<u, J v> = <Jᵀ u, v>; Hessian-vector products forward-over-reverse = reverse-over-reverse."""
    model = build_model(ModelConfig(**MICRO, tie_embeddings=True, **VARIANTS[variant]), dtype=torch.float64)
    x, y = tokens(2, 6, 11), tokens(2, 6, 11, seed=1)
    params = params_of(model)
    v = random_tangent(params)
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    z, jv = jvp(f, (params,), (v,))
    u = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (jtu,) = vjp(f, params)[1](u)
    torch.testing.assert_close((u * jv).sum(), sum((jtu[n] * v[n]).sum() for n in params))
    grad = torch.func.grad(lambda p: F.cross_entropy(f(p).flatten(0, 1), y.flatten()))
    hv_forward = jvp(grad, (params,), (v,))[1]
    (hv_reverse,) = vjp(grad, params)[1](v)
    for n in params:
        torch.testing.assert_close(hv_forward[n], hv_reverse[n])


# ---------------------------------------------------------------- determinism, dtype, training


@pytest.mark.parametrize("preset", ["tiny", "paper_tiny"])
def test_seed_determinism_and_global_rng_untouched(preset):
    state = torch.get_rng_state()
    a, b, c = build_model(preset, seed=3), build_model(preset, seed=3), build_model(preset, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
        assert p.dim() == 1 or not torch.equal(p, r)


def test_initialization_statistics():
    model = build_model("small")
    std = model.config.init_std
    assert model.embed.weight.std().item() == pytest.approx(std, rel=0.02)
    assert model.blocks[0].mlp.w_down.weight.std().item() == pytest.approx(std / 8**0.5, rel=0.02)
    assert torch.equal(model.norm.weight, torch.ones(192))


def test_reference_initialization_statistics():
    """Matrices W (out, in) ~ N(0, 1/in), embedding ~ N(0, 1), LayerNorm gains one and biases zero."""
    model = build_model("paper_tiny", d_model=128, d_ff=512, vocab_size=2000, n_heads=4)
    assert model.embed.weight.std().item() == pytest.approx(1.0, rel=0.02)
    for name, p in model.named_parameters():
        if p.dim() == 2 and name != "embed.weight":
            assert p.std().item() == pytest.approx(p.shape[1] ** -0.5, rel=0.03), name
            assert abs(p.mean().item()) < 0.1 * p.shape[1] ** -0.5
    attn = model.blocks[1].attn
    assert torch.equal(attn.q_norm.weight, torch.ones(128)) and torch.equal(attn.k_norm.bias, torch.zeros(128))


def test_float64_model():
    m32, m64 = build_model("tiny"), build_model("tiny", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in [*m64.parameters(), m64.rope_cos, m64.rope_sin, m64.causal_mask])
    for p, q in zip(m32.parameters(), m64.parameters()):
        assert torch.equal(p.double(), q)  # same draws in both dtypes
    x = tokens(2, 32, 256)
    z64 = m64(x)
    assert z64.dtype == torch.float64
    torch.testing.assert_close(m32(x), z64.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m32.double().rope_cos, m64.rope_cos, rtol=1e-7, atol=0)  # buffers follow .to()


@pytest.mark.parametrize("preset", ["tiny", "paper_tiny"])
def test_tiny_model_fits_a_fixed_batch(preset):
    model = build_model(preset, vocab_size=32)
    x = tokens(2, 16, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    log_v = torch.log(torch.tensor(32.0)).item()
    if preset == "tiny":  # logits near zero at a 0.02 init
        assert losses[0] == pytest.approx(log_v, abs=0.1)
    else:  # fan-in init: logits of unit scale, so the first loss lies somewhat above log V
        assert log_v < losses[0] < log_v + 1.0
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- toy models


def test_toy_models():
    lin = linear_model(3, 2)
    assert lin(torch.randn(5, 3)).shape == (5, 2) and count_parameters(lin) == 8
    assert linear_model(3, 2, bias=False).bias is None
    net = mlp([4, 7, 7, 3], activation="relu")
    assert net(torch.randn(5, 4)).shape == (5, 3)
    assert count_parameters(net) == 4 * 7 + 7 + 7 * 7 + 7 + 7 * 3 + 3
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    state = torch.get_rng_state()
    assert torch.equal(mlp([4, 3], seed=5)[0].weight, mlp([4, 3], seed=5)[0].weight)
    assert not torch.equal(mlp([4, 3], seed=5)[0].weight, mlp([4, 3], seed=6)[0].weight)
    assert torch.equal(torch.get_rng_state(), state)


def test_toy_model_errors():
    with pytest.raises(ValueError, match="activation.*tanh"):
        mlp([2, 3], activation="swish")
    with pytest.raises(ValueError, match="sizes"):
        mlp([2])


def test_forward_rules_run_under_bfloat16_autocast():
    """Mixed precision: the tangent follows autocast's dtype and stays close to the float32 one."""
    model = build_model(ModelConfig(**MICRO))
    x = tokens(2, 6, 11)
    params = params_of(model)
    v = random_tangent(params)
    z32, jv32 = model(x, dots=v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, jv = model(x, dots=v)
    assert z.dtype == jv.dtype == torch.bfloat16
    torch.testing.assert_close(jv.float(), jv32, rtol=0.05, atol=0.05 * jv32.abs().max().item())
    torch.testing.assert_close(z.float(), z32, rtol=0.05, atol=0.05 * z32.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_tangents_equal_one_forward_per_slot(variant):
    """Slots carry several directions through one forward; slot k is J_k v_k of its own parameters only."""
    model = build_model(ModelConfig(**MICRO, tie_embeddings=True, **VARIANTS[variant]), dtype=torch.float64)
    x = tokens(2, 6, 11)
    params = params_of(model)
    v = random_tangent(params)
    names = list(params)
    slot_of = {name: [1, 3, 0][i % 3] if i < len(names) - 2 else 2 for i, name in enumerate(names)}  # out of order
    z, stack = model(x, dots={name: Slot(slot_of[name], v[name]) for name in names})
    torch.testing.assert_close(z, model(x), rtol=0, atol=0)
    assert len(stack) == 4
    for k in range(4):
        reference = oracles.subset_jvp(model, params, x, {n: v[n] for n in names if slot_of[n] == k})
        torch.testing.assert_close(stack[k], reference, rtol=1e-12, atol=1e-12)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operation returns inside a ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_tangents_hold_one_attention_weights_and_one_logits_tangent_at_a_time(variant):
    """A stack's attention-weights tangents (B, H, T, T) and logits tangents (B, T, V) are made slot by slot.

    Neither exists as one (S, ...) stack: the weights' are made and used per slot inside the forward, the
    logits' when the caller asks for slot k (``SlotTangents``), a fresh tensor each time.
    """
    config = ModelConfig(**MICRO, **VARIANTS[variant])
    model = build_model(config, dtype=torch.float64)
    batch, seq = 3, config.max_seq_len
    x = tokens(batch, seq, config.vocab_size)
    params = params_of(model)
    v = random_tangent(params)
    names = list(params)
    with _Shapes() as seen:
        z, stack = model(x, dots={name: Slot(i % 4, v[name]) for i, name in enumerate(names)})
        assert isinstance(stack, SlotTangents) and len(stack) == 4
        slots = list(stack)
    assert [t.shape for t in slots] == [z.shape] * 4
    assert slots[0].data_ptr() != stack[0].data_ptr()  # made anew on each access, not kept
    weights = (batch, config.n_heads, seq, seq)
    assert seen.shapes.count(weights) > 0  # the recorder sees the attention's products
    assert [shape for shape in seen.shapes if shape[1:] in (weights, tuple(z.shape))] == []
    with pytest.raises(IndexError, match="slot 4 out of range for 4 slots"):
        stack[4]
