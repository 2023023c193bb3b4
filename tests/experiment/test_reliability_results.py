"""A results table cut short or damaged is refused by name; refused runs and sweeps leave nothing behind."""

import functools
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
import torch

from gnlib.data.pipeline import build_run_data
from gnlib.experiment.runs import RunSpec, run
from gnlib.experiment.study import _cached_warmup_problem, study_table_from_sweep, warmup_checkpoint
from gnlib.experiment.sweep_results import read_results_table
from gnlib.models import build_model
from gnlib.notebook.parameters import notebook_output_dir
from gnlib.tools.report import main as report_main
from gnlib.tools.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "fixtures" / "sweep_probe.ipynb"
NOTEBOOK_02 = REPO / "notebooks" / "02_iteration_complexity.ipynb"


def study_sweep(folder: Path) -> Path:
    """A sweep folder of notebook 02 as gnlib.tools.sweep leaves it: results.csv and the sweep.json listing its runs."""
    rows = []
    for optimizer, m, lr, steps in [
        ("adamw", 1, 0.01, 40),
        ("adamw", 4, 0.01, 12),
        ("gn", 1, 0.01, 9),
        ("gn", 4, 0.01, 3),
    ]:
        rows.append(
            {
                "run_id": f"optimizers={optimizer},micro_batches={m}",
                "status": "ok",
                "error": None,
                "optimizer": optimizer,
                "micro_batches": m,
                "tokens_per_step": 512 * m,
                "lr": lr,
                "seed": 0,
                "steps_to_target": steps,
                "tokens_to_target": steps * 512 * m,
                "wall_time_to_target_s": steps * 0.1,
                "grad_equivalents_to_target": steps * m,
                "final_val_loss": 2.0,
                "target_loss": 2.2,
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    grid = {"optimizers": ["adamw", "gn"], "micro_batches": [1, 4]}
    (folder / "sweep.json").write_text(json.dumps({"grid": grid, "runs": [row["run_id"] for row in rows]}))
    return folder / "results.csv"


def cut(path: Path, share: float) -> None:
    """Keep the first ``share`` of the file's bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * share)])


def test_report_refuses_a_results_csv_cut_short_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """Cut to 80% of its bytes, a sweep's table is refused by name: README and notebooks/results unchanged."""
    monkeypatch.chdir(tmp_path)
    results = study_sweep(tmp_path / "outputs" / "demo")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results: demo -->\nold\n<!-- /results -->\n")
    cut(results, 0.8)
    assert report_main([str(results.parent), "--page", str(readme)]) == 2
    err = capsys.readouterr().err
    assert f"results_csv={str(results)!r}" in err and "python -m gnlib.tools.sweep GRID" in err
    assert readme.read_text() == "<!-- results: demo -->\nold\n<!-- /results -->\n"
    assert not (tmp_path / "notebooks").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (None, "lacks the rows of 4 of the 4 runs"),  # the header only
        (bytes(range(256)) * 4, "is not UTF-8 text"),
        (0.5, "ends in the middle of a line"),
        (b"a,b\n1,2\n", "lacks the column(s) ['run_id', 'status']"),
    ],
    ids=["empty", "header-only", "random-bytes", "half-cut", "not-a-sweep-table"],
)
def test_a_damaged_results_csv_is_refused_naming_the_file_and_the_fix(tmp_path, content, problem):
    results = study_sweep(tmp_path)
    if content is None:
        results.write_text(results.read_text().splitlines()[0] + "\n")
    elif isinstance(content, float):
        cut(results, content)
    else:
        results.write_bytes(content)
    for read in (read_results_table, study_table_from_sweep):
        with pytest.raises(ValueError) as err:
            read(results)
        assert problem in str(err.value) and str(results) in str(err.value)
        assert "python -m gnlib.tools.sweep GRID" in str(err.value)


def test_a_sweep_records_its_table_and_an_edited_table_is_refused(tmp_path):
    """sweep.json records the row count and SHA-256 of the table the sweep wrote; an edit keeping the rows fails."""
    spec = {"name": "probe", "notebook": str(PROBE), "grid": {"x": [1, 2]}}
    run_sweep(spec, output_root=tmp_path, verbose=False)
    results = tmp_path / "probe" / "results.csv"
    assert json.loads((tmp_path / "probe" / "sweep.json").read_text())["results"]["rows"] == 2
    assert read_results_table(results)["y"].tolist() == [1, 4]
    results.write_text(results.read_text().replace(",4,", ",5,"))
    with pytest.raises(ValueError, match=r"differs from the table of 2 row\(s\) the sweep recorded"):
        read_results_table(results)


def test_study_table_names_sweep_results_for_a_missing_file_or_a_sweep_without_an_ok_run(tmp_path):
    with pytest.raises(ValueError, match=r"sweep_results='.*nowhere\.csv' does not exist"):
        study_table_from_sweep(tmp_path / "nowhere.csv")
    results = study_sweep(tmp_path)
    results.write_text(results.read_text().replace(",ok,", ",failed,"))
    with pytest.raises(ValueError, match=r"sweep_results=.* has no run with status ok.*--retry-failed"):
        study_table_from_sweep(results)


def test_notebook_02_refuses_a_cut_sweep_results_before_writing_anything(tmp_path):
    """A half-cut sweep_results stops notebook 02 by the parameter's name; its output_dir is never made."""
    results = study_sweep(tmp_path / "sweep")
    cut(results, 0.5)
    out = tmp_path / "summary"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(NOTEBOOK_02),
            str(tmp_path / "run.ipynb"),
            parameters={"sweep_results": str(results), "output_dir": str(out)},
            kernel_name="python3",
            progress_bar=False,
        )
    assert "sweep_results=" in str(err.value) and "cut short" in str(err.value)
    assert not out.exists()


def notebook_namespace(notebook: Path, **injected) -> dict:
    """A notebook's namespace after its parameters cell and papermill's injected cell, with IPython's ``In``."""
    cells = nbformat.read(notebook, as_version=4).cells
    parameters = next(c.source for c in cells if "parameters" in c.metadata.get("tags", []))
    injection = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in injected.items())
    namespace = {"In": ["", parameters, injection]}
    for source in namespace["In"]:
        exec(source, {"nan": float("nan"), "inf": float("inf")}, namespace)
    return namespace


def one_file_corpus(tmp_path: Path) -> str:
    (tmp_path / "only.txt").write_text("one document\n")
    return f"text:{tmp_path}/only.txt"


@pytest.mark.parametrize(
    ("notebook", "change", "message"),
    [
        ("00_quickstart", {"preset": "huge"}, "preset='huge'"),
        ("00_quickstart", {"steps": -1}, "steps=-1 is invalid; allowed: an integer >= 1"),
        ("00_quickstart", {"steps": 0}, "steps=0 is invalid"),
        (
            "00_quickstart",
            {"seq_len": 100_000},
            "seq_len=100000 is invalid; allowed: at most the tiny preset's max_seq_len",
        ),
        ("00_quickstart", {"corpus": "text:/nonexistent/*.txt"}, "matches 0 file(s)"),
        ("00_quickstart", {"corpus": "one-file"}, "matches 1 file(s)"),
        ("00_quickstart", {"tokenizer": "bpe:0"}, "tokenizer='bpe:0'"),
        ("02_iteration_complexity", {"max_steps": 0}, "max_steps=0 is invalid; allowed: an integer >= 1"),
        ("02_iteration_complexity", {"lr": float("nan")}, "lr=nan is invalid; allowed: a finite number"),
        ("02_iteration_complexity", {"seeds": [-1]}, "seeds=[-1] is invalid; allowed: an integer >= 0"),
        (
            "02_iteration_complexity",
            {"warmup_lr": float("inf")},
            "warmup_lr=inf is invalid; allowed: a finite number > 0",
        ),
        ("02_iteration_complexity", {"seq_len": 0}, "seq_len=0 is invalid; allowed: an integer >= 1"),
        ("02_iteration_complexity", {"corpus": "text:/nonexistent/*.txt"}, "corpus='text:/nonexistent/*.txt'"),
        ("02_iteration_complexity", {"sweep_results": "nowhere.csv"}, "sweep_results='nowhere.csv' does not exist"),
    ],
)
def test_a_refused_notebook_run_leaves_no_folder(tmp_path, notebook, change, message):
    """The values are checked before notebook_output_dir makes the run's folder."""
    if change.get("corpus") == "one-file":
        change = {"corpus": one_file_corpus(tmp_path)}
    out = tmp_path / "out"
    namespace = notebook_namespace(REPO / "notebooks" / f"{notebook}.ipynb", output_dir=str(out), **change)
    also = {"optimizers": str, "micro_batches": int, "seeds": int}
    with pytest.raises(ValueError) as err:
        notebook_output_dir(namespace, also_accept=also)
    assert message in str(err.value)
    assert not out.exists()
    notebook_output_dir(notebook_namespace(REPO / "notebooks" / f"{notebook}.ipynb", output_dir=str(out)), also)
    assert out.is_dir()  # the defaults pass, and then the folder is made


def test_a_bad_corpus_leaves_no_lock_in_the_warmup_cache(tmp_path):
    spec = RunSpec(corpus=one_file_corpus(tmp_path), steps=2, batch_size=2, seq_len=16)
    with pytest.raises(ValueError, match=r"corpus=.* matches 1 file\(s\)"):
        warmup_checkpoint(spec, 2, root=tmp_path / "warmup")
    assert not (tmp_path / "warmup").exists()


@pytest.mark.parametrize(
    ("parameters", "grid", "message"),
    [
        ({"max_steps": -6}, {"seeds": [0]}, "max_steps=-6 is invalid; allowed: an integer >= 1"),
        ({"preset": "huge"}, {"seeds": [0]}, "preset='huge'"),
        ({}, {"micro_batches": [2.5]}, "micro_batches=2.5 is invalid; allowed: an integer >= 1"),
    ],
)
def test_a_sweep_refuses_a_grid_the_notebook_would_refuse_before_any_kernel(tmp_path, parameters, grid, message):
    spec = {"name": "bad", "notebook": str(NOTEBOOK_02), "parameters": parameters, "grid": grid}
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(spec, output_root=tmp_path, verbose=False)
    assert not (tmp_path / "bad").exists()


def test_a_failed_run_of_other_values_does_not_block_the_corrected_sweep(tmp_path):
    """A run that failed with a value since corrected runs again; an ok run of other values is still refused."""
    folder = tmp_path / "probe" / "seed=0"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"x": -6, "seed": 0}))
    (folder / "status.json").write_text(json.dumps({"run_id": "seed=0", "status": "failed", "error": "bad x"}))
    spec = {"name": "probe", "notebook": str(PROBE), "parameters": {"x": 2}, "seeds": [0]}
    plan = run_sweep(spec, output_root=tmp_path, dry_run=True, verbose=False)
    assert plan[["state", "will_run"]].values.tolist() == [["changed", True]]
    assert run_sweep(spec, output_root=tmp_path, verbose=False)[["status", "y"]].values.tolist() == [["ok", 4]]
    with pytest.raises(ValueError, match=r"made with other values of \['x'\]"):
        run_sweep({**spec, "parameters": {"x": 3}}, output_root=tmp_path, verbose=False)


def test_seeds_given_as_text_are_named_as_seeds(tmp_path):
    spec = {"name": "probe", "notebook": str(PROBE), "seeds": "0"}
    with pytest.raises(ValueError, match=r"^seeds='0': must be a non-empty list of seeds, e.g. seeds: \[0, 1\]$"):
        run_sweep(spec, output_root=tmp_path, dry_run=True, verbose=False)


def test_corpus_bytes_is_named_as_corpus_bytes(tmp_path):
    with pytest.raises(ValueError, match=r"^corpus_bytes=True is invalid; allowed: an integer >= 1"):
        RunSpec(corpus_bytes=True).validate()
    with pytest.raises(ValueError, match=r"raise corpus_bytes$"):
        build_run_data(RunSpec(corpus_bytes=10, batch_size=2, seq_len=4), torch.device("cpu"))


def checkpointing_notebook(path: Path) -> Path:
    """A sweepable notebook whose loop writes a checkpoint on KeyboardInterrupt and resumes from it."""
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('steps: int = 40  # loop steps\noutput_dir: str = "outputs/loop"')
    parameters.metadata["tags"] = ["parameters"]
    loop = """import json, time
from pathlib import Path

out = Path(output_dir)
saved = out / "checkpoint.json"
start = done = json.loads(saved.read_text())["step"] if saved.is_file() else 0
(out / "started").write_text("")
try:
    while done < steps:
        time.sleep(0.25)
        done += 1
except KeyboardInterrupt:
    saved.write_text(json.dumps({"step": done}))
    raise
(out / "results.json").write_text(json.dumps({"resumed_from": start, "steps": done}))"""
    notebook.cells = [parameters, nbformat.v4.new_code_cell(loop)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_sweep_lets_its_runs_checkpoint_and_the_rerun_resumes_them(tmp_path, signum):
    notebook = checkpointing_notebook(tmp_path / "loop.ipynb")
    grid = tmp_path / "loop.yaml"
    grid.write_text(f"notebook: {notebook}\nparameters: {{steps: 40}}\n")
    command = [sys.executable, "-m", "gnlib.tools.sweep", str(grid), "--output-root", str(tmp_path / "out")]
    run_dir = tmp_path / "out" / "loop" / "default"
    # started with SIGINT ignored, as a shell script's background job is: the sweep still stops on it
    ignore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ignore_sigint
    )
    deadline = time.monotonic() + 60
    while not (run_dir / "started").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signum, output
    assert "run the same command to resume" in output
    step = json.loads((run_dir / "checkpoint.json").read_text())["step"]
    assert step > 0 and not (run_dir / "status.json").exists() and (run_dir / "stopped.json").is_file()

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert json.loads((run_dir / "results.json").read_text()) == {"resumed_from": step, "steps": 40}
    assert json.loads((run_dir / "status.json").read_text())["status"] == "ok"


WARMUP_RUN = dict(preset="tiny", steps=2, batch_size=2, seq_len=16, eval_every=1, val_batches=1)
SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}


def test_the_warmup_cache_refuses_weights_other_than_the_ones_it_recorded(tmp_path, capsys):
    """Another warm-up's weights of the same shapes, or one changed tensor, fail the recorded SHA-256: made again."""
    base = RunSpec(**WARMUP_RUN, model_overrides=SMALL)
    path = warmup_checkpoint(base, 2, lr=3e-3, root=tmp_path)
    good = torch.load(path, weights_only=True)
    other = warmup_checkpoint(base, 2, lr=1e-3, root=tmp_path)
    assert other != path
    path.write_bytes(other.read_bytes())  # same shapes, other values
    assert "not the file recorded" in _cached_warmup_problem(path.parent, path.parent.name)
    capsys.readouterr()
    assert warmup_checkpoint(base, 2, lr=3e-3, root=tmp_path) == path
    assert "not the file recorded (SHA-256 in settings.json)" in capsys.readouterr().out
    rebuilt = torch.load(path, weights_only=True)
    assert all(torch.equal(rebuilt[k], good[k]) for k in good)


def test_an_init_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    small = build_model("tiny", seed=0, **SMALL)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    spec = RunSpec(**WARMUP_RUN, model_overrides={**SMALL, "d_model": 32}, init_checkpoint=str(tmp_path / "small.pt"))
    shapes = r"tensor '.*' has shape \(\d+, 16\) there, the model's is \(\d+, 32\)"
    with pytest.raises(ValueError, match=r"init_checkpoint='.*small\.pt': " + shapes):
        run(spec, progress=False)
