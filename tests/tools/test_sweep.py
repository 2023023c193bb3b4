"""Tests of gnlib.tools.sweep: grid checks are pure; a few real papermill runs of tests/fixtures/sweep_probe.ipynb."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from gnlib.tools.sweep import aggregate, best_points, main, run_sweep, threads_per_job
from gnlib.tools.sweep_grid import check_spec, expand_grid, load_grid, run_id

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests/fixtures/sweep_probe.ipynb"


REPLICATE = {"key": "seed", "values": [1, 2], "at_best": "x", "minimize": ["y"]}


def spec(**overrides):
    """A grid spec over the probe notebook, its path relative to the repository root."""
    return {"name": "probe", "notebook": PROBE, **overrides}


def mtimes(sweep_dir):
    """Modification times of every file inside the run folders."""
    return {path: path.stat().st_mtime_ns for path in sweep_dir.glob("*/*")}


def test_expand_grid_is_the_ordered_product_over_fixed_parameters():
    """Runs follow the grid's key order, the last key (seeds) varying fastest, fixed parameters in each."""
    runs = expand_grid(spec(parameters={"sleep": 0.0}, grid={"x": [1, 2], "fail": [False, True]}, seeds=[0, 1]))
    assert len(runs) == 8
    assert runs[0] == {"sleep": 0.0, "x": 1, "fail": False, "seed": 0}
    assert runs[1] == {"sleep": 0.0, "x": 1, "fail": False, "seed": 1}
    assert runs[2] == {"sleep": 0.0, "x": 1, "fail": True, "seed": 0}
    assert runs[-1] == {"sleep": 0.0, "x": 2, "fail": True, "seed": 1}
    assert len({json.dumps(run, sort_keys=True) for run in runs}) == 8
    assert expand_grid(spec(parameters={"x": 3})) == [{"x": 3}]


def test_a_list_of_grids_runs_the_union_of_their_products_in_order(tmp_path):
    """One product per entry (e.g. an LR grid per optimizer), same keys in the first entry's order, seeds in each."""
    grids = spec(
        parameters={"sleep": 0.0}, grid=[{"x": [1], "fail": [False, True]}, {"fail": [False], "x": [5, 6]}], seeds=[0]
    )
    runs = expand_grid(grids)
    assert runs == [
        {"sleep": 0.0, "x": 1, "fail": False, "seed": 0},
        {"sleep": 0.0, "x": 1, "fail": True, "seed": 0},
        {"sleep": 0.0, "x": 5, "fail": False, "seed": 0},
        {"sleep": 0.0, "x": 6, "fail": False, "seed": 0},
    ]
    plan = run_sweep({**grids, "seeds": None}, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert list(plan["run_id"]) == ["x=1,fail=False", "x=1,fail=True", "x=5,fail=False", "x=6,fail=False"]


def test_run_ids_are_readable_filesystem_safe_and_distinct():
    """Plain values read as key=value; odd or long ones are sanitized and told apart by a hash."""
    assert run_id({"optimizer": "gn", "batch": 8, "lr": 0.001, "seed": 0}) == "optimizer=gn,batch=8,lr=0.001,seed=0"
    assert run_id({"lr": 1e-05, "layers": [1, 2]}) == run_id({"lr": 1e-05, "layers": [1, 2]})
    assert run_id({}) == "default"
    odd = [run_id({"path": value}) for value in ["a/b", "a_b", "a b", "..", "x" * 200, "y" * 200]]
    assert len(set(odd)) == len(odd)
    for rid in odd:
        assert re.fullmatch(r"[A-Za-z0-9._=,+~-]+", rid) and len(rid) <= 96, rid


@pytest.mark.parametrize(
    "bad, key",
    [
        (["x"], "mapping"),
        ({"name": "probe"}, "notebook"),
        (spec(grid={"x": 3}), "'x'"),
        (spec(grid={"x": []}), "'x'"),
        (spec(grdi={"x": [1]}), "'grdi'"),
        (spec(name="a/b"), "name"),
        (spec(name=".."), "name"),
        (spec(parameters=[1, 2]), "parameters"),
        (spec(parameters={"x": 1}, grid={"x": [2]}), "'x'"),
        (spec(grid={"output_dir": ["elsewhere"]}), "'output_dir'"),
        (spec(grid={"seed": [0]}, seeds=[1]), "seeds"),
        (spec(timeout=0), "timeout"),
        (spec(parameters={"x": {1, 2}}), "'x'"),
        (spec(grid=[]), "grid"),
        (spec(grid=[{"x": [1]}, {"fail": [True]}]), "grid[1]"),
        (spec(grid=[{"x": [1]}, [2]]), "grid[1]"),
        (spec(grid=[{"x": [1]}, {"x": []}]), "grid[1] key 'x'"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={"key": "seed", "values": [1], "at_best": "x"}), "minimize"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "at_best": "lr"}), "at_best='lr'"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "key": "x"}), "key and at_best"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "values": []}), "values"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "minimize": "y"}), "minimize"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "at_best": ["x", "y"]}), "at_best=['x', 'y']"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "at_best": []}), "at_best=[]"),
        (spec(grid={"x": [1]}, seeds=[0], replicate={**REPLICATE, "at_best": ["x", "seed"]}), "key and at_best"),
        (spec(grid={"x": [1]}, extends="/abs/published"), "extends"),
        (spec(grid={"x": [1]}, extends=3), "extends"),
    ],
)
def test_malformed_specs_are_refused_naming_the_key(bad, key):
    """Each structural mistake raises ValueError whose message names the offending key."""
    with pytest.raises(ValueError, match=re.escape(key)):
        expand_grid(bad)


def test_load_grid_reads_exponents_as_floats_and_resolves_the_notebook(tmp_path):
    """YAML 1e-3 is a float; the notebook is looked up under cwd first, then next to the grid file."""
    grid = tmp_path / "lr_grid.yaml"
    shutil.copy(REPO / PROBE, tmp_path / "local.ipynb")
    grid.write_text("notebook: local.ipynb\ngrid:\n  sleep: [1e-3, 2.5E+1]\n  x: [1, 2]\nseeds: [3]\ntimeout: 60\n")
    loaded = load_grid(grid, cwd=REPO)
    assert loaded == {
        "name": "lr_grid",
        "notebook": str((tmp_path / "local.ipynb").resolve()),  # not under cwd: found next to the grid file
        "parameters": {},
        "grid": {"sleep": [0.001, 25.0], "x": [1, 2], "seed": [3]},
        "timeout": 60,
        "replicate": None,
        "extends": None,
    }
    (tmp_path / PROBE).parent.mkdir(parents=True)
    shutil.copy(REPO / PROBE, tmp_path / PROBE)
    grid.write_text(f"name: first\nnotebook: {PROBE}\n")
    assert load_grid(grid, cwd=REPO)["notebook"] == str(REPO / PROBE)  # cwd wins over the grid file's folder
    grid.write_text("notebook: missing.ipynb\n")
    with pytest.raises(ValueError, match="notebook"):
        load_grid(grid, cwd=REPO)
    grid.write_text("- notebook\n- grid\n")
    with pytest.raises(ValueError, match="mapping"):
        load_grid(grid, cwd=REPO)


@pytest.mark.parametrize(
    "grid, key",
    [
        ({"z": [1]}, "'z'"),
        ({"x": ["three"]}, "'x'"),
        ({"x": [True]}, "'x'"),
        ({"sleep": [1, "a"]}, "'sleep'"),
        ({"x": [1, "1"]}, "appears twice"),
        ([{"x": [1]}, {"z": [2]}], "grid[1]"),
        ([{"x": [1]}, {"x": ["three"]}], "'x'"),
        ([{"x": [1, 2]}, {"x": [2]}], "appears twice"),
    ],
)
def test_notebook_parameters_are_checked_before_any_run(tmp_path, grid, key):
    """Unknown names, mistyped values and colliding run ids are refused before a folder exists."""
    with pytest.raises(ValueError, match=re.escape(key)):
        run_sweep(spec(grid=grid), output_root=tmp_path, cwd=REPO, verbose=False)
    assert not any(tmp_path.iterdir())


def test_notebook_without_output_dir_is_not_sweepable(tmp_path):
    """A notebook must declare output_dir to be swept."""
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell("x: int = 1  # value", metadata={"tags": ["parameters"]})]
    nbformat.write(notebook, tmp_path / "plain.ipynb")
    with pytest.raises(ValueError, match="output_dir"):
        run_sweep(spec(notebook="plain.ipynb"), output_root=tmp_path / "out", cwd=tmp_path, verbose=False)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_unknown_parameter_with_exit_code_2(tmp_path, capsys):
    """The CLI reports bad input on stderr with exit code 2 and creates nothing."""
    grid = tmp_path / "bad.yaml"
    grid.write_text(f"notebook: {REPO / PROBE}\ngrid:\n  lr: [0.1, 0.2]\n")
    assert main([str(grid), "--output-root", str(tmp_path / "out")]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finished_runs_made_with_other_parameters_are_refused(tmp_path):
    """The table reads ok and incomplete folders; a finished run with other fixed values stops a re-run."""
    run_dir = tmp_path / "probe" / "x=2"
    run_dir.mkdir(parents=True)
    (run_dir / "params.json").write_text(json.dumps({"sleep": 0.0, "x": 2}))
    (run_dir / "status.json").write_text(json.dumps({"status": "ok", "error": None, "seconds": 1.0}))
    (run_dir / "results.json").write_text(json.dumps({"y": 4, "x": "clash"}))
    (tmp_path / "probe" / "x=3").mkdir()
    (tmp_path / "probe" / "x=3" / "params.json").write_text(json.dumps({"sleep": 0.0, "x": 3}))
    table = aggregate(tmp_path / "probe")
    done, killed = table.to_dict("records")
    assert (done["run_id"], done["status"], done["x"], done["y"], done["result_x"]) == ("x=2", "ok", 2, 4, "clash")
    assert (killed["run_id"], killed["status"], killed["x"]) == ("x=3", "incomplete", 3)
    assert pd.isna(killed["y"]) and pd.isna(killed["result_x"])
    with pytest.raises(ValueError, match="sleep"):
        run_sweep(spec(parameters={"sleep": 1.0}, grid={"x": [2, 3]}), output_root=tmp_path, cwd=REPO, verbose=False)


def test_sweep_records_failures_skips_finished_runs_and_retries_failed(tmp_path):
    """Two jobs in parallel; failures recorded; re-runs skip finished runs; --retry-failed redoes failed ones."""
    grid = spec(parameters={"sleep": 0.5}, grid={"x": [2, 3], "fail": [False, True]})
    sweep_dir = tmp_path / "probe"
    table = run_sweep(grid, jobs=2, output_root=tmp_path, cwd=REPO, verbose=False)

    assert list(table.run_id) == ["x=2,fail=False", "x=2,fail=True", "x=3,fail=False", "x=3,fail=True"]
    assert list(table.status) == ["ok", "failed", "ok", "failed"]
    ok, failed = table[table.status == "ok"], table[table.status == "failed"]
    assert list(ok.y) == [4, 9]
    assert list(failed.error) == [f"RuntimeError: probe failure requested for x={x}" for x in (2, 3)]
    for rid in table.run_id:
        assert {"notebook.ipynb", "params.json", "log.txt", "status.json"} <= {
            p.name for p in (sweep_dir / rid).iterdir()
        }
    assert "probe failure requested" in (sweep_dir / "x=3,fail=True" / "log.txt").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(sweep_dir / "results.csv"), aggregate(sweep_dir))
    pd.testing.assert_frame_equal(aggregate(sweep_dir), table)

    spans = [json.loads((sweep_dir / rid / "status.json").read_text()) for rid in table.run_id]
    spans = [(datetime.fromisoformat(s["started"]), datetime.fromisoformat(s["finished"])) for s in spans]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]), (
        "--jobs 2 ran serially"
    )

    before = mtimes(sweep_dir)
    plan = run_sweep(grid, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert list(plan.state) == ["ok", "failed", "ok", "failed"] and not plan.will_run.any()
    pd.testing.assert_frame_equal(run_sweep(grid, jobs=2, output_root=tmp_path, cwd=REPO, verbose=False), table)
    assert mtimes(sweep_dir) == before

    retried = run_sweep(grid, jobs=2, output_root=tmp_path, cwd=REPO, retry_failed=True, verbose=False)
    assert list(retried.status) == ["ok", "failed", "ok", "failed"]
    after = mtimes(sweep_dir)
    for rid in table.run_id:
        status = sweep_dir / rid / "status.json"
        assert (after[status] == before[status]) == rid.endswith("fail=False"), rid


def test_cell_timeout_fails_the_run(tmp_path):
    """A cell running past the timeout fails the run with a timeout message."""
    table = run_sweep(spec(grid={"sleep": [30.0]}, timeout=1), output_root=tmp_path, cwd=REPO, verbose=False)
    assert list(table.status) == ["failed"]
    assert "timed out" in table.error[0]


def test_killed_sweep_resumes_without_losing_or_duplicating_runs(tmp_path):
    """Kill the CLI mid-run; the re-run keeps the finished run and redoes the killed one from scratch."""
    grid = tmp_path / "killed.yaml"
    grid.write_text(f"notebook: {REPO / PROBE}\ngrid:\n  sleep: [0.0, 3.0]\n")
    sweep_dir = tmp_path / "out" / "killed"
    slow = sweep_dir / "sleep=3.0"
    with open(tmp_path / "cli.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gnlib.tools.sweep", str(grid), "--output-root", str(tmp_path / "out")],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not ((slow / "log.txt").is_file() and "Executing Cell 4" in (slow / "log.txt").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    fast_status = sweep_dir / "sleep=0.0" / "status.json"
    assert json.loads(fast_status.read_text())["status"] == "ok"
    assert not (slow / "status.json").exists()
    (slow / "stale.txt").write_text("left by the killed run")
    fast_mtime = fast_status.stat().st_mtime_ns

    table = run_sweep(grid, output_root=tmp_path / "out", cwd=REPO, verbose=False)
    assert list(table.run_id) == ["sleep=0.0", "sleep=3.0"] and list(table.status) == ["ok", "ok"]
    assert fast_status.stat().st_mtime_ns == fast_mtime
    assert not (slow / "stale.txt").exists() and json.loads((slow / "results.json").read_text())["y"] == 1
    assert list(pd.read_csv(sweep_dir / "results.csv").run_id) == ["sleep=0.0", "sleep=3.0"]


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with the sweep through prctl (Linux)")
def test_kill_9_of_a_parallel_sweep_leaves_no_orphans_and_the_rerun_is_complete(tmp_path):
    """Kill -9 of the sweep process alone (``--jobs 2``, two runs executing): its workers die with it.

    The re-run completes every run folder, with each run once in results.csv.
    """
    grid = tmp_path / "parallel.yaml"
    grid.write_text(f"notebook: {REPO / PROBE}\ngrid:\n  sleep: [0.0, 6.0]\n  x: [1, 2]\n")
    sweep_dir = tmp_path / "out" / "parallel"
    slow = [sweep_dir / "sleep=6.0,x=1", sweep_dir / "sleep=6.0,x=2"]
    with open(tmp_path / "cli.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gnlib.tools.sweep",
                str(grid),
                "--jobs",
                "2",
                "--output-root",
                str(tmp_path / "out"),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not all((d / "log.txt").is_file() and "Executing Cell 4" in (d / "log.txt").read_text() for d in slow):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "cli.log").read_text()
            time.sleep(0.05)
        assert len(_processes_mentioning(str(grid))) == 3  # the sweep and its two workers
    finally:
        proc.kill()  # SIGKILL to the sweep process only, as `kill -9 <pid>` does
        proc.wait()
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(grid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(grid)) == [], "sweep workers outlived the killed sweep"
    assert not any((d / "status.json").exists() for d in slow)

    table = run_sweep(grid, output_root=tmp_path / "out", cwd=REPO, jobs=2, verbose=False)
    runs = ["sleep=0.0,x=1", "sleep=0.0,x=2", "sleep=6.0,x=1", "sleep=6.0,x=2"]
    assert list(table.run_id) == runs and set(table.status) == {"ok"}
    assert list(pd.read_csv(sweep_dir / "results.csv").run_id) == runs
    for run_dir in sweep_dir.glob("sleep=*"):
        assert {p.name for p in run_dir.iterdir()} >= {"params.json", "notebook.ipynb", "results.json", "status.json"}


def test_unwritable_output_root_is_refused_before_any_run(tmp_path, capsys):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output root should be")
    grid = tmp_path / "probe.yaml"
    grid.write_text(f"notebook: {REPO / PROBE}\ngrid:\n  x: [1]\n")
    assert main([str(grid), "--output-root", str(blocker)]) == 2
    error = capsys.readouterr().err
    assert "--output-root=" in error and "cannot be written" in error


@pytest.mark.parametrize("grid", sorted(p.name for p in (REPO / "notebooks" / "grids").glob("*.yaml")))
def test_shipped_grids_plan_runs_with_the_notebooks_parameters(tmp_path, grid):
    """Every grid under notebooks/grids names only parameters its notebook declares, with matching types."""
    plan = run_sweep(REPO / "notebooks" / "grids" / grid, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert len(plan) and plan["will_run"].all()
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"optimizers": [["adamw", "adam"]]}, "optimizers='adam' is invalid; allowed: one of"),
        ({"hyperparameters": [{"gn": {"inner_steps": True}}]}, "optimizer 'gn': inner_steps=True is invalid"),
        ({"learning_rates": [{"adamw": "3e-3"}]}, "optimizer 'adamw': lr='3e-3' is invalid"),
        ({"optimizers": [["gn_cg"]], "hyperparameters": [{"gn_cg": {"solver": "muon"}}]}, "'gn_cg' fixes solver"),
    ],
)
def test_optimizer_options_of_every_run_are_checked_against_their_schema(tmp_path, grid, message):
    """A grid run with a bad optimizer option is refused before any run, naming the run and the option."""
    bad = {"name": "bad", "notebook": str(REPO / "notebooks" / "00_quickstart.ipynb"), "grid": grid}
    with pytest.raises(ValueError, match=r"grid run .*: .*" + re.escape(message)):
        run_sweep(bad, output_root=tmp_path, cwd=REPO, verbose=False)
    assert not any(tmp_path.iterdir())


def test_best_points_pick_per_setting_the_value_with_the_best_median_outcomes():
    """Median over a value's runs, missing or non-finite outcomes as +inf, later outcomes breaking ties."""
    runs = [
        ({"opt": "a", "lr": 1, "seed": 0}, {"steps": 10, "loss": 2.0}),
        ({"opt": "a", "lr": 1, "seed": 1}, {"steps": None, "loss": 3.0}),  # missed: +inf, median of (10, inf)
        ({"opt": "a", "lr": 2, "seed": 0}, {"steps": 12, "loss": 2.5}),
        ({"opt": "a", "lr": 2, "seed": 1}, {"steps": 14, "loss": 2.5}),
        ({"opt": "b", "lr": 1, "seed": 0}, {"steps": None, "loss": 3.0}),
        ({"opt": "b", "lr": 2, "seed": 0}, {"steps": float("nan"), "loss": 2.0}),  # ties at +inf: loss decides
        ({"opt": "b", "lr": 3, "seed": 0}, None),  # failed: does not compete
        ({"opt": "c", "lr": 1, "seed": 0}, {"steps": 1, "loss": 1.0}),
        ({"opt": "c", "lr": 2, "seed": 0}, "pending"),  # unfinished: the setting is not decided yet
        ({"opt": "d", "lr": 1, "seed": 0}, None),  # nothing finished ok: no point
    ]
    best = best_points(runs, ["opt"], "lr", ["steps", "loss"])
    assert best == [{"opt": "a", "lr": 2, "seed": 0}, {"opt": "b", "lr": 2, "seed": 0}]


def test_best_points_over_several_keys_pick_the_best_combination_per_setting():
    """``at_best`` as a list: one winner per setting over every (lr, damping) pair, not one per damping."""
    runs = [
        ({"opt": "kfac", "lr": lr, "damping": d, "seed": 0}, {"steps": steps})
        for lr, d, steps in [(0.1, 0.1, 30), (0.3, 0.1, 20), (0.3, 1.0, 25), (1.0, 1.0, None)]
    ]
    assert best_points(runs, ["opt"], ["lr", "damping"], ["steps"]) == [runs[1][0]]
    assert len(best_points(runs, ["opt", "damping"], "lr", ["steps"])) == 2  # one per damping


def test_replicate_repeats_each_settings_best_run_with_new_seeds(tmp_path):
    """Tune on seed 0, repeat the winner (y = x² + seed, best x = 0) with seeds 1 and 2, named like grid runs."""
    grid = spec(grid={"x": [-1, 0, 2]}, seeds=[0], replicate=REPLICATE)
    plan = run_sweep(grid, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert list(plan["run_id"]) == ["x=-1,seed=0", "x=0,seed=0", "x=2,seed=0"]  # repeats wait for the grid
    table = run_sweep(grid, jobs=2, output_root=tmp_path, cwd=REPO, verbose=False)
    assert list(table["run_id"]) == ["x=-1,seed=0", "x=0,seed=0", "x=2,seed=0", "x=0,seed=1", "x=0,seed=2"]
    assert list(table["y"]) == [1, 0, 4, 1, 2]
    threads = int(os.environ.get("OMP_NUM_THREADS", threads_per_job(2)))  # two jobs share the cores out
    assert list(table["threads"]) == [threads] * 5
    assert (table["status"] == "ok").all()
    manifest = json.loads((tmp_path / "probe" / "sweep.json").read_text())
    assert manifest["runs"] == list(table["run_id"]) and manifest["replicate"] == REPLICATE
    plan = run_sweep(grid, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert list(plan["run_id"]) == list(table["run_id"]) and not plan["will_run"].any()
    widened = spec(grid={"x": [-1, 0, 2, -3]}, seeds=[0], replicate={**REPLICATE, "minimize": ["missing", "y"]})
    plan = run_sweep(widened, output_root=tmp_path, cwd=REPO, dry_run=True, verbose=False)
    assert list(plan.loc[plan["will_run"], "run_id"]) == ["x=-3,seed=0"]  # the grid first; repeats after it


def test_a_sweep_extends_only_a_published_sweep_of_the_same_notebook_and_parameters(tmp_path):
    """``extends`` must name a sweep folder of the same notebook and parameters; it is checked before any run."""
    published = tmp_path / "published"
    run_sweep(
        spec(name="published", parameters={"sleep": 0.0}, grid={"x": [1]}),
        output_root=tmp_path,
        cwd=REPO,
        verbose=False,
    )
    grid = spec(name="more", parameters={"sleep": 0.0}, grid={"x": [2]}, extends="nowhere/published")
    with pytest.raises(ValueError, match="extends=.*no sweep folder"):
        run_sweep(grid, output_root=tmp_path, cwd=REPO, verbose=False)
    grid["extends"] = os.path.relpath(published, REPO)
    other = {**grid, "parameters": {"sleep": 0.5}}
    with pytest.raises(ValueError, match=r"extends=.*sleep=0\.5 here, 0\.0 there"):
        run_sweep(other, output_root=tmp_path, cwd=REPO, verbose=False)
    assert not (tmp_path / "more").exists()  # refused before any run folder
    budget = {**grid, "parameters": {"sleep": 0.0, "max_steps": 5}}  # a run budget may differ
    assert check_spec(budget, search=[REPO])["extends"] == grid["extends"]
    table = run_sweep(grid, output_root=tmp_path, cwd=REPO, verbose=False)
    assert table["x"].tolist() == [2]  # only its own runs
    assert json.loads((tmp_path / "more" / "sweep.json").read_text())["extends"] == grid["extends"]
