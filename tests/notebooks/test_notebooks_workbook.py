"""The workbook notebooks (01, 04, 05), executed headlessly with small parameters, write what they promise."""

import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from gnlib.tools.nbtools import figure_problems

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SMALL_TRANSFORMER = {"n_layers": 1, "seq_len": 8, "corpus_bytes": 100_000, "train_batch": 8}


def execute(name: str, tmp_path: Path, **parameters) -> Path:
    """Run notebook ``name`` with ``parameters`` and ``output_dir`` under tmp_path, check it shows every figure."""
    out = tmp_path / name
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(tmp_path / f"{name}.executed.ipynb"),
        parameters={**parameters, "output_dir": str(out)},
        kernel_name="python3",
        progress_bar=False,
    )
    assert figure_problems(nbformat.read(tmp_path / f"{name}.executed.ipynb", as_version=4)) == []
    return out


def pngs(out: Path, *names: str) -> None:
    for name in names:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 1000, name


def test_gauss_newton_from_scratch(tmp_path):
    out = execute(
        "01_gauss_newton_from_scratch",
        tmp_path,
        steps=8,
        grid_points=25,
        n_train=128,
        outer_steps=4,
        inner_steps=4,
        dampings=[0.0, 10.0],
    )
    results = json.loads((out / "results.json").read_text())
    pngs(out, "trajectories.png", "eigenvalues_at_start.png", "damping.png", "gn_loop.png")
    assert results["parameters"]["steps"] == 8 and set(results["final_loss"]) == {
        "gradient descent",
        "Newton",
        "Gauss-Newton",
    }
    assert min(results["eigenvalues_at_start"]["G"]) >= 0 > min(results["eigenvalues_at_start"]["H"])
    assert results["final_loss"]["Gauss-Newton"] < results["final_loss"]["gradient descent"]
    # more damping: shorter steps, less progress in the same number of iterations
    assert results["damped_final_loss"]["GN, λ = 0"] < results["damped_final_loss"]["GN, λ = 10"]
    assert results["mlp_checks"]["max |G_hand − dense_ggn|"] < 1e-12
    assert len(results["gn_loop"]) == 5 and len(results["gauss_newton_optimizer"]) == 5


def test_curvature_explorer(tmp_path):
    out = execute(
        "04_curvature_explorer",
        tmp_path,
        **SMALL_TRANSFORMER,
        curvature_batch=2,
        checkpoints=[0, 20],
        top_k=3,
        slq_probes=2,
        slq_iter=10,
        operator_batch=1,
        operator_iter=5,
    )
    results = json.loads((out / "results.json").read_text())
    pngs(
        out,
        "block_norms_per_layer.png",
        "block_norms_per_tensor.png",
        "off_diagonal_share.png",
        "residual_per_layer.png",
        "top_eigenvalues.png",
        "spectral_density.png",
        "operator_only_density.png",
    )
    table = pd.read_csv(out / "results.csv")
    assert table["step"].tolist() == [0, 20] and results["n_params"] < 1500
    for prefix in ("off_diagonal_G", "off_diagonal_H"):
        layer, tensor = table[f"{prefix}_per_layer"], table[f"{prefix}_per_tensor"]
        assert layer.between(0, 1).all() and (tensor >= layer - 1e-12).all()  # per tensor refines per layer
    assert (table["lambda_min_G"] >= -1e-9 * table["lambda_max_G"]).all() and (table["lambda_min_H"] < 0).all()
    assert results["lanczos_relative_error"]["GGN"] < 1e-3
    (big,) = results["operator_only"]
    assert big["n_params"] > 100_000 and len(big["top_eigenvalues"]) == 3 and big["trace"] > 0


def test_approximation_gap_by_conjugate_gradients(tmp_path):
    out = execute(
        "05_approximation_gap",
        tmp_path,
        **SMALL_TRANSFORMER,
        curvature_batch=4,
        checkpoints=[0, 30],
        solve="cg",
        damping=0.1,
        damping_sweep=[0.1, 1.0],
        kfac_samples=4,
    )
    results = json.loads((out / "results.json").read_text())
    pngs(out, "cosine.png", "reduction_ratio.png", "blockwise_cosine.png", "damping_sweep.png")
    table = pd.read_csv(out / "results.csv")
    methods = ["exact GN", "layerwise GN", "diagonal GGN", "K-FAC", "Shampoo", "SOAP", "Adam", "Muon", "gradient"]
    assert table[table["step"] == 0]["method"].tolist() == methods
    assert table[table["step"] == 30]["method"].tolist() == methods + ["Adam (training EMA)"]
    exact = table[table["method"] == "exact GN"]
    assert exact["reduction_ratio"].tolist() == pytest.approx([1.0, 1.0]) and exact["cosine"].tolist() == pytest.approx(
        [1.0, 1.0]
    )
    assert table["reduction_ratio"].between(0, 1 + 1e-9).all() and table["descent"].all()
    assert set(results["damping_used"]) == {"0", "30"} and all(lam > 0 for lam in results["damping_used"].values())
    sweep = pd.read_csv(out / "damping_sweep.csv")
    assert sorted(sweep["relative_damping"].unique()) == [0.1, 1.0]


def test_approximation_gap_from_a_checkpoint_reads_raw_bytes_and_refuses_another_vocabulary(tmp_path):
    """``init_checkpoint``: the directions are taken at the file's weights, on raw byte ids (vocab_size 256)."""
    import torch

    from gnlib.models import build_model

    shape = dict(vocab_size=256, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8)
    weights = tmp_path / "model.pt"
    torch.save(build_model("tiny", seed=3, **shape).state_dict(), weights)
    small = {**SMALL_TRANSFORMER, "curvature_batch": 2, "solve": "cg", "damping": 0.1, "kfac_samples": 2}
    run = dict(small, checkpoints=[0], damping_sweep=[0.1], init_checkpoint=str(weights))
    with pytest.raises(papermill.PapermillExecutionError, match="vocab_size=32 is invalid; allowed: 256"):
        execute("05_approximation_gap", tmp_path, **run)
    out = execute("05_approximation_gap", tmp_path, **run, vocab_size=256)
    results = json.loads((out / "results.json").read_text())
    assert results["n_params"] == sum(t.numel() for t in torch.load(weights, weights_only=True).values())
    exact = pd.read_csv(out / "results.csv").set_index("method").loc["exact GN"]
    assert exact["step"] == 0 and exact["reduction_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["01_gauss_newton_from_scratch", "04_curvature_explorer", "05_approximation_gap"])
def test_help_lists_typed_described_parameters(name):
    params = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    for key in ("seed", "device", "output_dir"):
        assert key in params, key
    for key, info in params.items():
        assert info["inferred_type_name"] != "None" and info["help"], key
    assert params["output_dir"]["default"].strip("\"'") == f"outputs/{name}"
