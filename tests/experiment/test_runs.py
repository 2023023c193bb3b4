"""Runs: a spec's validation names the bad field; steps to target, cost and summary rows of a History."""

import dataclasses

import pytest

from gnlib.experiment.history import History
from gnlib.experiment.runs import RunSpec, grad_equivalents, steps_to_target, summarize

MODEL = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)
BASE = RunSpec(steps=6, batch_size=8, seq_len=32, eval_every=1, val_batches=2, model_overrides=MODEL)


def history(losses, costs=None, accumulation=1):
    rows = [{"step": 0, "tokens": 0, "wall_time": 0.0, "val_loss": losses[0]}]
    for step, loss in enumerate(losses[1:], start=1):
        row = {"step": step, "tokens": 100 * step, "wall_time": 0.1 * step, "val_loss": loss}
        if costs is not None:
            row["grad_equivalents"] = costs[step - 1]
        rows.append(row)
    return History(rows=rows, status="completed", metadata={"spec": {"accumulation": accumulation}})


def test_steps_to_target_and_cost():
    h = history([5.0, 4.0, None, 3.0, 2.5], accumulation=4)
    assert steps_to_target(h, 3.0) == 3 and steps_to_target(h, 2.0) is None and steps_to_target(h, 5.0) == 0
    assert grad_equivalents(h) == 16 and grad_equivalents(h, 3) == 12  # 4 micro-batches per step
    gn = history([5.0, 4.0, 3.0], costs=[7.5, 8.0])
    row = summarize(gn, 3.5)
    assert row["steps_to_target"] == 2 and row["grad_equivalents_to_target"] == 15.5 and row["grad_equivalents"] == 15.5
    assert row["tokens_to_target"] == 200 and row["wall_time_to_target_s"] == pytest.approx(0.2)
    assert row["cost_model"] is None  # no pass costs recorded (a first-order run's metadata has none)
    missed = summarize(gn, 1.0)
    assert missed["grad_equivalents_to_target"] is None and missed["tokens_to_target"] is None
    assert missed["wall_time_to_target_s"] is None
    h = history([5.0, 4.0, None, 3.0, 2.5], accumulation=4)
    assert summarize(h, 3.0)["tokens_to_target"] == 300  # the step where the evaluation first reached it


@pytest.mark.parametrize(
    "change, field",
    [
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"preset": "huge"}, "preset"),
        ({"seq_len": 4096}, "seq_len"),
        ({"init_checkpoint": "/no/such.pt"}, "init_checkpoint"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_runspec_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(BASE, **change).validate()


def test_validate_rejects_bad_corpus_target_and_optimizer_options():
    for kwargs, match in [
        (dict(corpus="foo"), "corpus"),
        (dict(target_loss="x"), "target_loss"),
        (dict(optimizer="gn", hyperparameters={"inner_iters": 3}), "inner_iters"),
        (dict(optimizer="adamw", hyperparameters={"bogus": 1}), "bogus"),
    ]:
        with pytest.raises(ValueError, match=match):
            RunSpec(**kwargs).validate()


def test_a_run_evaluated_on_an_ema_reports_the_raw_iterate_beside_it():
    """The EMA trails the iterate: steps, tokens, time and cost to target on both, the raw one sooner."""
    h = history([5.0, 4.5, 4.0, 3.5, 3.0], costs=[2.0] * 4)
    for row, raw in zip(h.rows, [5.0, 3.9, 2.9, 2.5, 2.2]):
        row["val_loss_raw"] = raw
    row = summarize(h, 3.0)
    assert (row["steps_to_target"], row["steps_to_target_raw"]) == (4, 2)
    assert (row["tokens_to_target"], row["tokens_to_target_raw"]) == (400, 200)
    assert (row["grad_equivalents_to_target"], row["grad_equivalents_to_target_raw"]) == (8.0, 4.0)
    assert row["wall_time_to_target_raw_s"] == pytest.approx(0.2) and row["final_val_loss_raw"] == 2.2
    plain = summarize(history([5.0, 4.0, 3.0]), 3.0)  # no EMA: the raw iterate is the evaluated one
    assert plain["steps_to_target_raw"] == plain["steps_to_target"] == 2
    assert plain["final_val_loss_raw"] == plain["final_val_loss"]


def test_an_early_target_is_read_off_the_same_run_and_cpu_time_beside_wall_time():
    h = history([5.0, 4.5, 4.0, 3.5, 3.0], costs=[2.0] * 4)
    for row, raw in zip(h.rows, [5.0, 3.9, 2.9, 2.5, 2.2]):
        row["val_loss_raw"] = raw
        row["cpu_time"] = 0.05 * row["step"]  # another job shared the cores: half the wall time
    row = summarize(h, 3.0, early_target=4.0)
    assert (row["steps_to_early_target"], row["steps_to_early_target_raw"]) == (2, 1)
    assert (row["steps_to_target"], row["steps_to_target_raw"]) == (4, 2)  # the lower target is unchanged
    assert (row["tokens_to_early_target"], row["grad_equivalents_to_early_target_raw"]) == (200, 2.0)
    assert row["cpu_time_to_early_target_s"] == pytest.approx(0.1) and row[
        "wall_time_to_early_target_s"
    ] == pytest.approx(0.2)
    assert row["cpu_time_to_early_target_raw_s"] == pytest.approx(0.05)
    assert row["cpu_time_to_target_s"] == pytest.approx(0.2) and row["cpu_time_s"] == pytest.approx(0.2)
    assert "steps_to_early_target" not in summarize(h, 3.0)  # no early target, no such columns
    old = summarize(history([5.0, 4.0, 3.0]), 3.0)  # rows recorded before runs kept CPU time
    assert old["cpu_time_to_target_s"] is None and old["cpu_time_s"] is None
