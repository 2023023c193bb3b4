"""Pass costs: the FLOP model priced by hand, measured costs recorded and cached, explicit costs winning."""

import dataclasses

import pytest
import torch

from gnlib import curvature
from gnlib.curvature import costs
from gnlib.curvature.blocks import per_layer, resolve_partition
from gnlib.curvature.costs import (
    FLOP_PASS_COSTS,
    PASSES,
    cache_key,
    count_flops,
    layerwise_pass_counts,
    measure_pass_costs,
    price,
)
from gnlib.experiment.runs import RunSpec, run, summarize
from gnlib.losses import CrossEntropy
from gnlib.models import build_model, linear_jvp, mlp
from gnlib.optim import GaussNewton

MODEL = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32)
# N = 4 inner steps, the line search on B = 3 batches over the default grid of K = 5 step sizes
SPEC = RunSpec(
    optimizer="gn",
    lr=0.01,
    steps=2,
    batch_size=4,
    seq_len=16,
    eval_every=1,
    val_batches=1,
    model_overrides=MODEL,
    hyperparameters={"inner_steps": 4, "line_search_batches": 3},
)


@pytest.fixture(autouse=True)
def fresh_memory_cache(monkeypatch):
    monkeypatch.setattr(costs, "_MEASURED", {})


def step_rows(history):
    return history.rows[1:]


def test_flop_model_prices_a_gn_step_by_hand():
    history = run(dataclasses.replace(SPEC, costs="flops"), None, progress=False)
    assert history.metadata["pass_costs"] == {"model": "flops", **FLOP_PASS_COSTS}
    for row in step_rows(history):
        # inner: N x (forward, tangent, backward); line search: B x (forward + tangent, then K forwards)
        assert (row["forward_passes"], row["tangent_passes"], row["backward_passes"]) == (4 + 3 * 6, 4 + 3, 4)
        assert row["grad_equivalents"] == pytest.approx(22 / 3 + 7 * 2 / 3 + 4 * 2 / 3)  # 44/3
    assert summarize(history)["cost_model"] == "flops"


def test_count_flops_counts_a_linear_layer_and_its_fused_tangent_by_hand():
    layer = torch.nn.Linear(3, 5)
    x, x_dot = torch.randn(7, 3), torch.randn(7, 3)
    assert count_flops(lambda: layer(x)) == 2 * 7 * 3 * 5
    # y, then ẋWᵀ and xẆᵀ summed into one buffer by an in-place addmm_
    with torch.no_grad():
        flops = count_flops(lambda: linear_jvp(layer, x, x_dot, {"weight": torch.randn(5, 3)}))
    assert flops == 3 * 2 * 7 * 3 * 5


def test_flop_model_equals_the_counted_flops_of_a_transformer():
    model = build_model("tiny", seed=0, **MODEL)
    tokens = torch.randint(model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch, loss = (tokens[:, :-1], tokens[:, 1:]), CrossEntropy()
    params = dict(model.named_parameters())
    delta = {name: torch.randn_like(p) for name, p in params.items()}
    grad = count_flops(lambda: torch.autograd.grad(loss.value(model(batch[0]), batch[1]), list(params.values())))
    with torch.no_grad():
        forward = count_flops(lambda: model(batch[0]))
    inner = count_flops(lambda: curvature.gn_inner_step(model, params, delta, batch, loss))
    assert forward / grad == pytest.approx(FLOP_PASS_COSTS["forward"], rel=1e-12)
    assert inner / grad == pytest.approx(price({"forward": 1, "tangent": 1, "backward": 1}, FLOP_PASS_COSTS), rel=1e-12)


@pytest.mark.parametrize("partition", ["per_layer", "per_tensor"])
@pytest.mark.parametrize("slots", [None, 2])
def test_layerwise_pass_counts_price_the_counted_layerwise_step(partition, slots):
    """Under the FLOP model the counted passes cost what the stacked layerwise step's products count."""
    model = build_model("tiny", seed=0, **{**MODEL, "n_layers": 2})
    tokens = torch.randint(model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch, loss = (tokens[:, :-1], tokens[:, 1:]), CrossEntropy()
    params = dict(model.named_parameters())
    blocks = list(resolve_partition(partition, model).values())
    deltas = [{name: torch.randn_like(params[name]) for name in names} for names in blocks]
    grad = count_flops(lambda: torch.autograd.grad(loss.value(model(batch[0]), batch[1]), list(params.values())))
    step = count_flops(lambda: curvature.layerwise_inner_steps(model, params, deltas, batch, loss, slots=slots))
    counts = layerwise_pass_counts(model, blocks, batch[0], slots)
    assert counts[0] == -(-len(blocks) // (slots or len(blocks)))
    assert counts[1] < len(blocks) and counts[2] < len(blocks)  # partial passes, cheaper than whole ones
    assert price(dict(zip(PASSES, counts)), FLOP_PASS_COSTS) == pytest.approx(step / grad, rel=1e-12)


def test_stacked_layerwise_step_does_the_products_of_one_inner_step_per_block_less_the_shared_primal():
    model = build_model("tiny", seed=0, **{**MODEL, "n_layers": 2})
    tokens = torch.randint(model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch, loss = (tokens[:, :-1], tokens[:, 1:]), CrossEntropy()
    params = dict(model.named_parameters())
    deltas = [{name: torch.randn_like(params[name]) for name in names} for names in per_layer(model).values()]
    with torch.no_grad():
        primal = count_flops(lambda: model(batch[0]))
    apart = [count_flops(lambda d=d: curvature.gn_inner_step(model, params, d, batch, loss)) for d in deltas]
    stacked = count_flops(lambda: curvature.layerwise_inner_steps(model, params, deltas, batch, loss))
    assert stacked == sum(apart) - (len(deltas) - 1) * primal


def test_layerwise_pass_counts_are_whole_passes_without_forward_mode_rules():
    model = mlp([3, 4, 2])
    blocks = list(resolve_partition("per_layer", model).values())
    assert layerwise_pass_counts(model, blocks, torch.randn(5, 3)) == (1, len(blocks), len(blocks) + 1)


def test_measured_costs_are_positive_recorded_and_change_no_training_number():
    measured = run(SPEC, None, progress=False)
    record = measured.metadata["pass_costs"]
    assert record["model"] == "measured" and all(record[k] > 0 for k in PASSES)
    assert record["forward"] + record["backward"] == pytest.approx(1.0)  # a gradient step costs 1
    assert record["key"]["batch_size"] == 4 and record["key"]["seq_len"] == 16
    assert set(record["ms"]) == {"grad", "forward", "inner_step"}
    flops = run(dataclasses.replace(SPEC, costs="flops"), None, progress=False)
    for a, b in zip(measured.rows, flops.rows):  # same losses and passes: only the cost column differs
        assert {k: v for k, v in a.items() if k not in ("wall_time", "cpu_time", "grad_equivalents")} == {
            k: v for k, v in b.items() if k not in ("wall_time", "cpu_time", "grad_equivalents")
        }
    for row in step_rows(measured):
        counts = {k: row[f"{k}_passes"] for k in PASSES}
        assert row["grad_equivalents"] == pytest.approx(price(counts, record))


def test_explicit_pass_costs_win():
    given = {"forward": 0.25, "tangent": 1.0, "backward": 0.75}
    spec = dataclasses.replace(SPEC, steps=1, hyperparameters={**SPEC.hyperparameters, "pass_costs": given})
    history = run(spec, None, progress=False)
    assert history.metadata["pass_costs"] == {"model": "given", **given}
    assert history.rows[1]["grad_equivalents"] == pytest.approx(22 * 0.25 + 7 * 1.0 + 4 * 0.75)
    first_order = run(dataclasses.replace(SPEC, optimizer="adamw", hyperparameters={}, steps=1), None, progress=False)
    assert first_order.metadata["pass_costs"] is None  # one gradient step per micro-batch under any model


def test_measurements_are_cached_per_configuration(tmp_path):
    model = build_model("tiny", seed=0, **MODEL)
    first = measure_pass_costs(model, 4, 16, repeats=1, min_seconds=0, cache_dir=tmp_path)
    assert first["source"] == "timed" and (tmp_path / f"{first['key_hash']}.json").is_file()
    again = measure_pass_costs(model, 4, 16, repeats=1, min_seconds=0, cache_dir=tmp_path)
    assert again["source"] == "memory" and {k: again[k] for k in PASSES} == {k: first[k] for k in PASSES}
    costs._MEASURED.clear()  # a new process: the file answers
    from_file = measure_pass_costs(model, 4, 16, repeats=1, min_seconds=0, cache_dir=tmp_path)
    assert from_file["source"] == str(tmp_path / f"{first['key_hash']}.json")
    assert {k: from_file[k] for k in PASSES} == {k: first[k] for k in PASSES}
    # every part of the configuration is in the key
    key = cache_key(model, 4, 16)
    assert cache_key(model, 8, 16) != key and cache_key(model, 4, 32) != key
    assert cache_key(build_model("tiny", seed=0, **{**MODEL, "d_model": 32}), 4, 16) != key
    assert cache_key(build_model("tiny", seed=0, **MODEL).double(), 4, 16)["dtype"] == "torch.float64"
    assert key["tangents"] == "model rules" and cache_key(mlp([3, 4, 2]), 4, 16)["tangents"] == "forward_ad"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert cache_key(model, 4, 16) != key
    finally:
        torch.set_num_threads(threads)
    assert measure_pass_costs(model, 8, 16, repeats=1, min_seconds=0, cache_dir=tmp_path)["source"] == "timed"
    # a torn cache file is measured again and rewritten
    costs._MEASURED.clear()
    (tmp_path / f"{first['key_hash']}.json").write_text("{not json")
    assert measure_pass_costs(model, 4, 16, repeats=1, min_seconds=0, cache_dir=tmp_path)["source"] == "timed"
    assert measure_pass_costs(model, 4, 16, repeats=1, min_seconds=0, use_cache=False)["source"] == "timed"


def test_measuring_leaves_the_model_and_random_state_alone():
    model = build_model("tiny", seed=0, **MODEL)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    measure_pass_costs(model, 2, 8, repeats=1, min_seconds=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "bad, parameter",
    [
        (dict(costs="time"), r"costs='time' is invalid; allowed: one of \['measured', 'flops'\]"),
        (dict(hyperparameters={"pass_costs": "measured"}), "pass_costs='measured' is invalid"),
        (dict(hyperparameters={"pass_costs": {"forward": 1.0, "tangent": -1.0, "backward": 1.0}}), "pass_costs="),
    ],
)
def test_bad_cost_settings_are_refused_before_any_work(bad, parameter):
    with pytest.raises(ValueError, match=parameter):
        dataclasses.replace(SPEC, **bad).validate()


def test_gauss_newton_names_bad_pass_costs():
    model = build_model("tiny", seed=0, **MODEL)
    with pytest.raises(ValueError, match=r"pass_costs=\{'forward': 1.0\} is invalid; allowed: a dict"):
        GaussNewton(model, lambda: None, pass_costs={"forward": 1.0})
    with pytest.raises(ValueError, match="model='Linear' is invalid; allowed: a token model"):
        measure_pass_costs(torch.nn.Linear(2, 2), 2, 2)


def test_a_resumed_run_keeps_the_costs_it_started_with(tmp_path, monkeypatch):
    monkeypatch.setenv("GNLIB_OUTPUT_ROOT", str(tmp_path))  # measured costs are cached under outputs/pass_costs
    first = run(SPEC, tmp_path / "run", progress=False)
    record = first.metadata["pass_costs"]
    assert (tmp_path / "outputs" / "pass_costs" / f"{record['key_hash']}.json").is_file()
    monkeypatch.setattr(costs, "_MEASURED", {})
    (tmp_path / "outputs" / "pass_costs" / f"{record['key_hash']}.json").unlink()
    again = run(SPEC, tmp_path / "run", progress=False)  # same settings: resumed, not measured anew
    assert again.metadata["pass_costs"] == record and again.rows == first.rows
    assert not (tmp_path / "outputs" / "pass_costs" / f"{record['key_hash']}.json").exists()
