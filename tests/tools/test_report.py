"""Tests of gnlib.tools.report: the docs' results tables come from committed sweep tables, never by hand."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gnlib.experiment.study import EARLY_TARGET_COLUMNS, STUDY_COLUMNS
from gnlib.tools.report import block_markdown, default_pages, main, page_blocks, update_pages
from gnlib.tools.results_tables import _variant_lines, results_markdown

REPO = Path(__file__).resolve().parents[2]
NAN = np.nan


def sweep_table(path: Path, gn_ema_lead: float = 0) -> Path:
    """A results.csv as a sweep of notebook 02 writes it: tuned on seed 0, winners repeated with seeds 1-2.

    ``gn_ema_lead`` > 0: GN is evaluated on an EMA, its raw iterate reaching the target that many times sooner.
    """
    runs = [  # optimizer, micro_batches, lr, seed, steps to target (NaN: missed)
        *[("adamw", 1, 0.001, 0, 150)],
        *[("adamw", 1, 0.003, s, v) for s, v in enumerate([100, 110, 120])],
        *[("adamw", 4, 0.001, 0, 90)],
        *[("adamw", 4, 0.003, s, v) for s, v in enumerate([50, NAN, 60])],
        *[("muon", 1, 0.01, s, v) for s, v in enumerate([80, 90, 85])],
        *[("muon", 1, 0.03, 0, 95)],
        *[("muon", 4, 0.01, s, v) for s, v in enumerate([NAN, NAN, 30])],
        *[("muon", 4, 0.03, 0, NAN)],
        *[("gn", 1, 0.01, s, v) for s, v in enumerate([20, 22, 24])],
        *[("gn", 1, 0.03, 0, 30)],
        *[("gn", 4, 0.01, s, v) for s, v in enumerate([5, 6, 7])],
        *[("gn", 4, 0.03, 0, 9)],
    ]
    rows = []
    start = pd.Timestamp("2026-01-01T00:00:00+00:00")
    for i, (optimizer, m, lr, seed, steps) in enumerate(runs):  # runs of 60 s started every 20 s
        cost = steps * m * (3.0 if optimizer == "gn" else 1.0)
        lead = gn_ema_lead if gn_ema_lead and optimizer == "gn" else 1  # the raw iterate's steps: steps / lead
        rows.append(
            {
                "optimizer": optimizer,
                "micro_batches": m,
                "tokens_per_step": 1024 * m,
                "lr": lr,
                "seed": seed,
                "steps_to_target": steps,
                "tokens_to_target": steps * 1024 * m,
                "wall_time_to_target_s": steps * 0.5,
                "cpu_time_to_target_s": steps * 0.25,
                "grad_equivalents_to_target": cost,
                "final_val_loss": 2.1 if steps == steps else 2.4,
                "steps_to_target_raw": steps / lead,
                "tokens_to_target_raw": steps / lead * 1024 * m,
                "wall_time_to_target_raw_s": steps / lead * 0.5,
                "cpu_time_to_target_raw_s": steps / lead * 0.25,
                "grad_equivalents_to_target_raw": cost / lead,
                "final_val_loss_raw": (2.1 if steps == steps else 2.4)
                - (0.1 if gn_ema_lead and optimizer == "gn" else 0),
                "steps": steps if steps == steps else 300,
                "tokens": 0,
                "grad_equivalents": 0.0,
                "wall_time_s": 1.0,
                "cpu_time_s": 0.5,
                "cost_model": "measured" if optimizer == "gn" else None,
                "result_status": "reached_target" if steps == steps else "completed",
                "status_reason": None,
                "status": "ok",
                "seconds": 60.0,
                "started": (start + pd.Timedelta(seconds=20 * i)).isoformat(),
                "finished": (start + pd.Timedelta(seconds=20 * i + 60)).isoformat(),
                "target_loss": 2.2,
            }
        )
    assert set(STUDY_COLUMNS) - {"status"} <= set(rows[0])
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    return path / "results.csv"


def test_results_markdown_reads_steps_off_the_raw_iterate_too_when_a_run_has_an_ema(tmp_path):
    assert "raw iterate" not in results_markdown(sweep_table(tmp_path))
    (tmp_path / "ema").mkdir()
    text = results_markdown(sweep_table(tmp_path / "ema", gn_ema_lead=2.0))
    evaluated, raw = text.split("The same on the raw iterate")[0], text.split("The same on the raw iterate")[1]
    assert "| full GN | 22 (20-24) | 6 (5-7) |" in evaluated and "| full GN | 11 (10-12) | 3 (2.5-3.5) |" in raw
    assert "| Muon | 85 (80-90) |" in raw  # no EMA: the same steps in both tables
    # at the largest batch: steps, tokens, CPU time and cost of GN's EMA, then of its raw iterate (half the steps)
    assert '"EMA / raw" where a setting is evaluated on an EMA' in text
    assert "| full GN | 6 / 3 | 24,576 / 12,288 | 2 / 1 | 72 / 36 |" in text  # median(5, 6, 7) = 6 steps of 4,096
    assert "| AdamW | 60 | 245,760 | 15 | 240 |" in text  # no EMA: one reading


def test_an_early_target_comes_first_and_ratios_stand_beside_the_studys(tmp_path):
    path = sweep_table(tmp_path)
    frame = pd.read_csv(path)
    frame["optimizer"] = frame["optimizer"].replace({"muon": "soap"})
    for column in EARLY_TARGET_COLUMNS:  # the early target: half the steps (and tokens, time, cost) of the lower
        frame[column] = frame[column.replace("_to_early_target", "_to_target")] / 2
    frame["early_target"] = 3.5
    frame.to_csv(path, index=False)
    text = results_markdown(path)
    early, lower = text.split("**At the lower target, val loss 2.2.**")
    assert "**At the early target, val loss 3.5.**" in early and "Outer steps to val loss 3.5" in early
    assert "| full GN | 11 (10-12) | 3 (2.5-3.5) |" in early and "| full GN | 22 (20-24) | 6 (5-7) |" in lower
    assert "| setting | 1,024 | 4,096 | study, 45M |" in early  # SOAP's 292 / GN's 54 steps on the 45M model
    assert "| SOAP | 3.9 (1.3) | - | 5.41 |" in early and "| AdamW | 5.0 (1.7) | 10.0 (3.3) | - |" in lower


def test_results_markdown_reports_medians_spreads_misses_ratios_and_costs(tmp_path):
    text = results_markdown(sweep_table(tmp_path))
    assert text.startswith("24 runs (24 ok) took 9 min of wall time, 24 min of run time summed over runs.")
    assert "Outer steps to val loss 2.2" in text and "median over 3 seed(s)" in text
    assert "| AdamW | 110 (100-120) | 60 (50-missed) |" in text  # LR tuned on seed 0: 0.003, not 0.001
    assert "| Muon | 85 (80-90) | missed (1/3) |" in text
    assert "| full GN | 22 (20-24) | 6 (5-7) |" in text
    # ratios: steps (cost); GN's cost is 3 per micro-batch step here
    assert "| AdamW | 5.0 (1.7) | 10.0 (3.3) |" in text
    assert "| Muon | 3.9 (1.3) | - |" in text
    assert "| AdamW | below the grid (at most 1,024 tokens) | needs three batch sizes reached |" in text
    assert "| full GN | beyond the grid (at least 4,096 tokens) | needs three batch sizes reached |" in text
    assert "| setting | steps | tokens | CPU time (s) |" in text  # every run recorded its CPU time
    assert "| full GN | 6 | 24,576 | 2 | 72 | 54 |" in text  # steps, tokens, CPU seconds, cost, the study's steps
    assert "| Muon | - | - | - | - | about 864 |" in text
    edges = re.search(r"Tuned LRs on the edge of their grid: (.*)\.", text).group(1)
    assert edges.split(", ") == [
        "AdamW at 1,024 (0.003)",
        "AdamW at 4,096 (0.003)",
        "Muon at 1,024 (0.01)",
        "Muon at 4,096 (0.01)",
        "full GN at 1,024 (0.01)",
        "full GN at 4,096 (0.01)",
    ]


def test_update_pages_replaces_only_the_sweeps_blocks_and_refuses_pages_without_one(tmp_path):
    csv = sweep_table(tmp_path)
    (tmp_path / "sweep.json").write_text('{"grid": [{"optimizers": ["gn"]}]}')
    readme, page, other = tmp_path / "README.md", tmp_path / "results.md", tmp_path / "other.md"
    block_b = "<!-- results: b -->\nb\n<!-- /results -->\n"
    readme.write_text("intro\n<!-- results: a headline -->\nold\n<!-- /results -->\nmiddle\n" + block_b)
    page.write_text("<!-- results: a -->\nold\n<!-- /results -->\n")
    other.write_text("no blocks\n")
    assert update_pages([readme, page, other], "a", csv) == [readme, page]
    headline, full = results_markdown(csv, headline=True), results_markdown(csv)
    assert readme.read_text() == f"intro\n<!-- results: a headline -->\n{headline}<!-- /results -->\nmiddle\n" + block_b
    assert page_blocks(readme) == {"a headline": headline, "b": "b\n"}
    assert page_blocks(page) == {"a": full} and other.read_text() == "no blocks\n"
    assert full.startswith("24 runs") and headline.startswith("Outer steps to val loss 2.2")
    assert headline.rstrip("\n") in full and "Critical batch" not in headline and "Ratio to full GN" in headline
    with pytest.raises(ValueError, match=r"no block for 'c'.*<!-- results: c -->"):
        update_pages([readme, page], "c", csv)


def test_cli_publishes_tables_and_refuses_a_folder_without_a_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "outputs" / "demo"
    sweep.mkdir(parents=True)
    sweep_table(sweep)
    (sweep / "sweep.json").write_text('{"grid": [{"optimizers": ["gn"]}]}')
    (tmp_path / "notebooks" / "figures").mkdir(parents=True)
    (sweep / "summary").mkdir()
    (sweep / "summary" / "steps_vs_batch.png").write_bytes(b"png")
    points = "method,direction,cosine,reduction_ratio,gain_share,gain_share_at_most,tokens_per_step,step\n"
    (sweep / "summary" / "directions_vs_steps.csv").write_text(points + "muon,Muon,0.1,0.02,0.0,0.0,4096,0\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- results: demo headline -->\n<!-- /results -->\n")
    (tmp_path / "docs" / "results.md").write_text("<!-- results: demo -->\n<!-- /results -->\n")
    assert main([str(sweep), "--figures", str(sweep / "summary")]) == 0
    assert "regenerated in README.md, docs/results.md" in capsys.readouterr().out
    assert page_blocks("README.md")["demo headline"] == results_markdown(sweep / "results.csv", headline=True)
    published = tmp_path / "notebooks" / "results" / "demo"
    assert page_blocks("docs/results.md")["demo"] == results_markdown(published / "results.csv")  # directions too
    assert (tmp_path / "notebooks" / "figures" / "demo_steps_vs_batch.png").read_bytes() == b"png"
    assert (published / "directions_vs_steps.csv").read_text().endswith("muon,Muon,0.1,0.02,0.0,0.0,4096,0\n")
    assert "| Muon | 0.100 | 0.020 | 0.00 |" in page_blocks("docs/results.md")["demo"]
    assert "Directions against" not in page_blocks("README.md")["demo headline"]
    (tmp_path / "docs" / "results.md").write_text("<!-- results: demo -->\n<!-- /results -->\n")
    assert main([str(sweep), "--page", "docs/results.md"]) == 0  # only the pages given
    assert page_blocks("docs/results.md")["demo"] == results_markdown(sweep / "results.csv")
    assert main([str(published), "--page", "docs/results.md"]) == 0  # the committed tables, republished in place
    assert (published / "results.csv").read_bytes() == (sweep / "results.csv").read_bytes()
    assert main([str(tmp_path / "outputs")]) == 2
    assert "lacks ['results.csv', 'sweep.json']" in capsys.readouterr().err
    assert main([str(sweep), "--page", "none.md"]) == 2
    assert "none.md does not exist" in capsys.readouterr().err


def test_a_directions_table_beside_the_results_ends_the_full_block(tmp_path):
    """Notebook 02's directions_vs_steps.csv beside results.csv: one row per direction, a missed share as its bound."""
    sweep_table(tmp_path)
    (tmp_path / "sweep.json").write_text('{"grid": [{"optimizers": ["adamw", "muon", "gn"]}]}')
    assert "Directions against steps" not in results_markdown(tmp_path / "results.csv")
    pd.DataFrame(
        {
            "method": ["kfac", "muon"],
            "direction": ["K-FAC", "Muon"],
            "cosine": [0.3584, 0.0893],
            "reduction_ratio": [0.0388, 0.0139],
            "gain_share": [NAN, 0.0],
            "gain_share_at_most": [-1.2, 0.0],
            "tokens_per_step": [4096, 4096],
            "step": [0, 0],
        }
    ).to_csv(tmp_path / "directions_vs_steps.csv", index=False)
    text = results_markdown(tmp_path / "results.csv")
    assert "beside its share of full GN's step gain at 4,096 tokens per step" in text
    assert "| K-FAC | 0.358 | 0.039 | missed (≤ -1.20) |" in text and "| Muon | 0.089 | 0.014 | 0.00 |" in text
    assert "Directions against steps" not in results_markdown(tmp_path / "results.csv", headline=True)


def test_the_docs_results_are_regenerated_from_the_committed_sweep_tables(monkeypatch):
    """Every results block of README and docs/ equals the markdown made from its committed table: none is typed."""
    monkeypatch.chdir(REPO)
    blocks = {(page, label): body for page in default_pages() for label, body in page_blocks(page).items()}
    published = {("README.md", "cpu_study headline"), ("docs/results.md", "cpu_study")}
    published |= {("README.md", "cpu_paper_study largest"), ("docs/results.md", "cpu_paper_study")}
    published |= {("README.md", "cpu_practical shares"), ("docs/results.md", "cpu_practical")}
    assert {(Path(page), label) for page, label in published} <= set(blocks)
    for (page, label), block in blocks.items():
        name = label.split()[0]
        expected = block_markdown(REPO / "notebooks" / "results" / name / "results.csv", label)
        assert block == expected, (
            f"{page}'s {label} tables differ from notebooks/results/{name}/results.csv: "
            f"run python -m gnlib.tools.report outputs/{name} --figures outputs/{name}/summary"
        )


def test_an_ablation_at_one_batch_names_its_settings_and_compares_them_to_the_first(tmp_path):
    """Variants of one optimizer at one batch: named by what they change, ratios to the default, no critical batch."""
    rows = [
        {"hyperparameters": options, "lr": lr, "seed": seed, "steps_to_target": steps}
        for options, lr, seed, steps in [
            ("{}", 0.01, 0, 6),
            ("{}", 0.03, 0, 8),
            ('{"gn": {"warm_start": false}}', 0.01, 0, 12),
            ('{"gn": {"warm_start": false}}', 0.03, 0, 9),
        ]
    ]
    common = {"optimizer": "gn", "micro_batches": 4, "tokens_per_step": 4096, "status": "ok", "target_loss": 2.2}
    table = pd.DataFrame([{**common, **row, "final_val_loss": 2.1} for row in rows])
    for column in ("tokens_to_target", "wall_time_to_target_s", "grad_equivalents_to_target"):
        table[column] = table["steps_to_target"] * 10
    table.to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "sweep.json").write_text('{"grid": [{"micro_batches": [4], "hyperparameters": ["{}"], "lr": [0.01]}]}')
    text = results_markdown(tmp_path / "results.csv")
    assert "| full GN | 6 |" in text and "| gn (warm_start=False) | 9 |" in text
    assert "Ratio to full GN of the median steps" in text and "| gn (warm_start=False) | 1.5 (1.5) |" in text
    assert "Critical batch" not in text
    assert "| gn (warm_start=False) | 9 | 90 | 90 | 90 | - |" in text


def test_costs_of_different_micro_batches_are_put_in_one_unit(tmp_path):
    """A run's gradient-step equivalents count gradient steps on its own micro-batch; tables use the smallest."""
    rows = [  # micro-batches of 16 sequences (128 per step) vs of 64 (32 per step): 2,048 vs 8,192 tokens
        {"batch_size": 16, "micro_batches": 128, "lr": 0.01, "steps_to_target": 5, "grad_equivalents_to_target": 1000},
        {"batch_size": 64, "micro_batches": 32, "lr": 0.01, "steps_to_target": 5, "grad_equivalents_to_target": 400},
    ]
    common = {"optimizer": "gn", "hyperparameters": "{}", "seed": 0, "seq_len": 128, "status": "ok"}
    table = pd.DataFrame([{**common, **row, "tokens_per_step": 262_144, "final_val_loss": 2.1} for row in rows])
    table["tokens_to_target"] = table["wall_time_to_target_s"] = 0
    table.to_csv(tmp_path / "results.csv", index=False)
    grid = [{"batch_size": [16], "micro_batches": [128]}, {"batch_size": [64], "micro_batches": [32]}]
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": grid}))
    text = results_markdown(tmp_path / "results.csv")
    assert "cost in gradient steps on 2,048 tokens" in text and "cost (gradient steps on 2,048 tokens)" in text
    assert "| gn (batch_size=64) | 1.0 (1.6) |" in text  # 400 steps on 8,192 tokens = 1,600 on 2,048
    assert "| gn (batch_size=64) | 5 | 0 | 0 | 1,600 |" in text


def test_a_sweep_extending_a_study_gets_each_methods_share_of_full_gns_gain(tmp_path, monkeypatch):
    """K-FAC added to a published study: its share over the best first-order method at each batch, by hand."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    base = pd.read_csv(sweep_table(tmp_path / "base"))
    (tmp_path / "base" / "sweep.json").write_text(json.dumps({"grid": [{"optimizers": ["gn"]}], "parameters": {}}))
    kfac = base.loc[base["optimizer"] == "muon"].assign(
        optimizer="kfac", hyperparameters='{"kfac": {"damping": 0.1}}', lr=0.3, steps_to_target=33.0
    )
    kfac.loc[kfac["micro_batches"] == 1, "steps_to_target"] = 54.0
    (tmp_path / "more").mkdir()
    kfac.to_csv(tmp_path / "more" / "results.csv", index=False)
    grid = [{"optimizers": ["kfac"], "hyperparameters": [{"kfac": {"damping": 0.1}}]}]
    (tmp_path / "more" / "sweep.json").write_text(json.dumps({"grid": grid, "parameters": {}, "extends": "base"}))
    text = results_markdown(tmp_path / "more" / "results.csv")
    # 1,024 tokens: Muon's median 85 is the best first-order, GN's 22: (85 - 54) / (85 - 22) = 0.49;
    # 4,096: Muon missed on most seeds, AdamW's median is 60, GN's 6: (60 - 33) / (60 - 6) = 0.50
    assert "| K-FAC | 0.49 | 0.50 |" in text and "| best first-order (steps) | Muon (85) | AdamW (60) |" in text
    assert "kfac (damping=0.1) at 1,024, kfac (damping=0.1) at 4,096" in text
    assert "| kfac (damping=0.1) | 54 (54-54) | 33 (33-33) |" in text  # its runs stand beside the study's


def test_a_largest_block_is_one_table_at_the_largest_batch_with_both_readings(tmp_path):
    """``<!-- results: NAME largest -->``: steps on the EMA and the raw iterate, and the raw ratio to GN, by hand."""
    text = results_markdown(sweep_table(tmp_path, gn_ema_lead=2), largest=True)
    assert text.startswith("24 runs (24 ok) took")
    assert "| setting | steps to 2.2 (EMA) | raw iterate | ratio at 2.2 (raw) | study, 45M |" in text
    # GN's raw iterate reaches the target at half its EMA's steps: median(5, 6, 7) / 2 = 3; AdamW's seeds
    # took 50, missed and 60, so its median is 60 and the ratio 60 / 3 = 20
    assert (
        "| full GN | 6 (5-7) | 3 (2.5-3.5) | - | - |" in text
        and "| AdamW | 60 (50-missed) | 60 (50-missed) | 20.0 | - |" in text
    )
    assert "At 4,096 tokens per step" in text and "Critical batch" not in text and "1,024 tokens" not in text


def test_the_variant_line_names_each_batchs_option_and_the_default_ones():
    chosen = pd.DataFrame(
        {
            "optimizer": ["kfac", "kfac", "kfac", "muon"],
            "tokens_per_step": [4096, 1024, 4096, 1024],
            "variant": ["kfac (damping=0.1)", "kfac", "kfac (damping=0.1)", None],
        }
    )
    assert _variant_lines(chosen) == [
        "Options tuned with the LR, the best at each batch: K-FAC default options at 1,024, damping=0.1 at 4,096.",
        "",
    ]
    assert _variant_lines(chosen.drop(columns="variant")) == []
