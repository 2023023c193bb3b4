"""Notebook parameters are checked by the notebook itself, before any work, with messages naming the fix."""

import re
from pathlib import Path

import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from gnlib.notebook.parameters import check_notebook_parameters, notebook_output_dir

REPO = Path(__file__).resolve().parents[2]
DECLARED = """steps: int = 30  # outer steps
seed: int = 0  # seed
optimizers: list = ["adamw", "gn"]  # optimizers
lr: float = 0.0  # one LR
learning_rates: dict = {"adamw": 0.003}  # LR per optimizer
overwrite: bool = False  # replace
output_dir: str = "outputs/00_quickstart"  # folder
"""


def namespace(injected: str = "", **values):
    """A notebook's globals after its parameters cell and papermill's injected cell ran."""
    names = {
        "steps": 30,
        "seed": 0,
        "optimizers": ["adamw", "gn"],
        "lr": 0.0,
        "learning_rates": {"adamw": 0.003},
        "overwrite": False,
        "output_dir": "outputs/00_quickstart",
    }
    history = ["", DECLARED, *([f"# Parameters\n{injected}"] if injected else []), "import gnlib"]
    return {**names, **values, "In": history}


def test_default_output_folder_follows_the_parameters_that_change_results():
    assert check_notebook_parameters(namespace()).output_folder() == "outputs/00_quickstart"
    changed = namespace("steps = 300\nseed = 1\n", steps=300, seed=1)
    assert check_notebook_parameters(changed).output_folder() == "outputs/00_quickstart/steps=300,seed=1"
    same_but_overwrite = namespace("overwrite = True\n", overwrite=True)
    assert check_notebook_parameters(same_but_overwrite).output_folder() == "outputs/00_quickstart"
    given = namespace("steps = 300\noutput_dir = 'elsewhere'\n", steps=300, output_dir="elsewhere")
    assert check_notebook_parameters(given).output_folder() == "elsewhere"
    listed = check_notebook_parameters(namespace("optimizers = ['gn']\n", optimizers=["gn"])).output_folder()
    assert listed.startswith("outputs/00_quickstart/optimizers=") and "~" in listed  # quotes replaced, hash added


@pytest.mark.parametrize(
    "injected, values, match",
    [
        ("stepz = 3\n", {"stepz": 3}, r"unknown notebook parameter\(s\) \['stepz'\].*parameters are \['steps'"),
        (
            "optimizers = 'gn'\n",
            {"optimizers": "gn"},
            r"notebook parameter: optimizers='gn' is invalid; allowed: a value of type list .*got a str",
        ),
        ("lr = 'fast'\n", {"lr": "fast"}, r"notebook parameter: lr='fast' is invalid; allowed: a value of type float"),
        (
            "lr = '3e-3'\n",
            {"lr": "3e-3"},
            r"lr='3e-3' is invalid; allowed: a value of type float .*a string: in YAML write floats with a dot",
        ),
        (
            "steps = True\n",
            {"steps": True},
            r"steps=True is invalid; allowed: a value of type int .*got a bool.*a bool is not a number",
        ),
        (
            "learning_rates = 'fast'\n",
            {"learning_rates": "fast"},
            r"learning_rates='fast' is invalid; allowed: a value of type dict .*'\{",
        ),
    ],
)
def test_bad_notebook_parameters_are_named(injected, values, match):
    with pytest.raises(ValueError, match=match):
        check_notebook_parameters(namespace(injected, **values))


@pytest.mark.parametrize(
    "notebook, parameters, match",
    [
        ("00_quickstart", {"optimizers": "gn"}, r"optimizers='gn' is invalid; allowed: a value of type list"),
        ("00_quickstart", {"stepz": 3}, r"unknown notebook parameter\(s\) \['stepz'\]"),
        ("02_iteration_complexity", {"optimizers": "gnx"}, r"optimizers='gnx' is invalid; allowed: one of"),
        ("02_iteration_complexity", {"lr": -0.01}, r"lr=-0.01 is invalid; allowed: a finite number >= 0"),
        (
            "02_iteration_complexity",
            {"target_loss": -1.0},
            r"target_loss=-1.0 is invalid; allowed: a finite number > 0",
        ),
        ("02_iteration_complexity", {"warmup_steps": -1}, r"warmup_steps=-1 is invalid; allowed: an integer >= 1"),
        (
            "02_iteration_complexity",
            {"warmup_batch_size": -1},
            r"the shared AdamW warm-up .*: warmup_batch_size=-1 is invalid; allowed: an integer >= 0",
        ),
    ],
)
def test_notebooks_refuse_bad_parameters_before_any_work(tmp_path, notebook, parameters, match):
    out = tmp_path / "out"
    with pytest.raises(PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(REPO / "notebooks" / f"{notebook}.ipynb"),
            str(tmp_path / "executed.ipynb"),
            parameters={**parameters, "output_dir": str(out)},
            cwd=str(REPO),
            progress_bar=False,
            kernel_name="python3",
        )
    # raised by the derived-values cell: the first after the parameters and the injected parameters
    assert (err.value.ename, err.value.exec_count) == ("ValueError", 3), (err.value.ename, err.value.evalue)
    assert re.search(match, err.value.evalue), err.value.evalue
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "injected, values, match",
    [
        (
            "optimizers = ['gnx']\n",
            {"optimizers": ["gnx"]},
            r"optimizers='gnx' is invalid; allowed: one of \['adamw'",
        ),
        (
            "learning_rates = {'adamw': True}\n",
            {"learning_rates": {"adamw": True}},
            r"optimizer 'adamw': lr=True is invalid",
        ),
    ],
)
def test_optimizer_settings_are_checked_against_their_schemas(tmp_path, injected, values, match):
    given = namespace(injected, **values, output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=match):
        notebook_output_dir(given)
    assert not (tmp_path / "out").exists()
