"""The results tables of a sweep of notebook 02, as Markdown: :func:`results_markdown` and its parts.

Steps to target (median over seeds, min-max) per optimizer and batch, on the EMA and the raw iterate where runs
have an EMA; ratios to a reference beside the study's own; each method's share of full GN's gain; critical batch
sizes; steps, tokens, time and cost at the largest batch. :mod:`gnlib.tools.report` writes them into the pages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from gnlib.experiment.lr_choice import VARIANT_OF, collapse_variants
from gnlib.experiment.method_comparison import FIRST_ORDER, gain_shares
from gnlib.experiment.study import at_early_target, critical_batch_size, study_table_from_sweep
from gnlib.experiment.sweep_results import read_results_table
from gnlib.notebook.tables import has_ema, time_to_target_column

#: Notebook 02's table of directions against steps (written with ``directions_results``), published beside
#: a sweep's results.csv.
DIRECTIONS_FILE = "directions_vs_steps.csv"
#: Display names of the optimizers, in the order tables list them.
NAMES = {
    "adamw": "AdamW",
    "muon": "Muon",
    "soap": "SOAP",
    "gn": "full GN",
    "gn_layerwise": "layerwise GN",
    "gn_prox": "GN-prox-linear",
    "shampoo": "Shampoo",
    "psgd": "PSGD",
    "kfac": "K-FAC",
}
#: Outer steps to val loss 3.25 on the study's 45M model, each optimizer past its critical batch
#: (docs/study.md, "Reported results"); AdamW is reported only as "more than Muon".
STUDY_45M_STEPS = {"gn": "54", "gn_layerwise": "78", "soap": "292", "muon": "about 864", "adamw": "more than Muon"}
#: The study's exact step counts among :data:`STUDY_45M_STEPS`.
_STUDY_NUMBERS = {o: s for o, s in STUDY_45M_STEPS.items() if s.isdigit()}


def results_markdown(
    results_csv: str | Path,
    reference: str = "gn",
    headline: bool = False,
    largest: bool = False,
    shares: bool = False,
    directions: str | Path | None = None,
) -> str:
    """Markdown tables of a batch-size sweep: steps to target with the seed spread, ratios, critical batch, costs.

    Every number is taken at each setting's tuned LR (:func:`~gnlib.experiment.lr_choice.choose_lr`); medians over
    seeds, a seed that missed the target counting as infinitely many steps. Settings are listed optimizers first
    (AdamW, Muon, SOAP, GN, layerwise GN, GN-prox-linear), then in the order the sweep ran them (e.g. the
    variants of an ablation, named by :func:`gnlib.experiment.study.variant_label`).

    Args:
        results_csv: ``results.csv`` of a :mod:`gnlib.tools.sweep` run of notebook 02 (its ``sweep.json`` beside it).
        reference: the setting the ratio table divides by (absent: the first setting listed).
        headline: only the steps to target and the ratios (the tables a front page quotes).
        largest: only the run time and one table at the largest batch: each target's steps (on the EMA and
            the raw iterate where runs have an EMA) and ratio to ``reference`` (a front page's summary).
        shares: only the table of each method's share of ``reference``'s step gain over the best first-order
            method at every batch (empty without such methods).
        directions: notebook 02's ``directions_vs_steps.csv`` (default: that file beside ``results_csv``,
            if there is one): the full text then ends with each direction's agreement with exact GN beside
            its method's share of the step gain.

    Returns:
        The markdown text: the runs and their wall time; steps to target per setting and tokens per step
        ("median (min-max)", "missed (k/n)" when most seeds missed); steps and cost ratios to ``reference``
        (costs in gradient steps on the table's smallest micro-batch, scaled by tokens per micro-batch);
        the critical batch size of each optimizer (with two batch sizes or more); tokens, time and cost to
        target at the largest batch (beside the study's 45M steps, for the optimizers it reports); and the
        tuned LRs on their grid's edge. With ``headline``, the steps and ratio tables alone. A sweep run with
        an early target gives its steps and ratio tables first, then the lower target's.

    Raises:
        ValueError: ``results_csv`` is cut short, damaged or not a sweep's table
            (:func:`gnlib.experiment.sweep_results.read_results_table`), naming the file and the fix.
    """
    raw = read_results_table(results_csv)
    table = collapse_variants(study_table_from_sweep(results_csv, parameter="results_csv"))
    chosen = table.loc[table["chosen"]].astype({"tokens_per_step": int})
    # Gradient-step equivalents count gradient steps on the run's own micro-batch: put them in one unit,
    # a gradient step on the smallest micro-batch of the table (FLOPs scale with the tokens of a pass).
    micro_tokens = chosen["tokens_per_step"] / chosen["micro_batches"]
    unit = int(micro_tokens.min())
    costs = [c for c in chosen.columns if c.startswith("grad_equivalents_to_")]
    chosen = chosen.assign(**{c: chosen[c].astype(float) * micro_tokens / unit for c in costs})
    order = list(dict.fromkeys(chosen["optimizer"]))
    settings = sorted(order, key=lambda n: (list(NAMES).index(n) if n in NAMES else len(NAMES), order.index(n)))
    batches = sorted(set(chosen["tokens_per_step"]))
    reference = reference if reference in settings else settings[0]
    if largest:
        return _largest_summary(raw, chosen, settings, batches[-1], reference)
    if shares:
        section = _shares_section(chosen, batches, reference)
        return "\n".join(section + (_variant_lines(chosen) if section else [])).rstrip("\n") + "\n"
    lines = []
    if "steps_to_early_target" in chosen.columns:
        early = at_early_target(chosen)
        lines += [f"**At the early target, {_target(raw, 'early_target')}.**", ""]
        lines += _target_sections(early, settings, batches, reference, unit, _target(raw, "early_target"))
        lines += [f"**At the lower target, {_target(raw, 'target_loss')}.**", ""]
    lines += _target_sections(chosen, settings, batches, reference, unit, _target(raw, "target_loss"))
    lines += _variant_lines(chosen)
    if headline:
        return "\n".join(lines).rstrip("\n") + "\n"
    if {"started", "finished", "seconds"} <= set(raw.columns):
        lines = [_timing(raw), "", *lines]
    if len(batches) > 1:
        critical = critical_batch_size(table).set_index("optimizer")
        lines += [
            "Critical batch size, two ways: where doubling the batch stops nearly halving the steps (a per-doubling "
            "steps ratio above 0.65; a number only where two batch sizes bracket it), and B_crit of the fit "
            "S = S_min (1 + B_crit / B) to the median steps (McCandlish et al. 2018):",
            "",
            _table(
                ["setting", "doubling rule", "fit"],
                [
                    [NAMES.get(o, o), *(critical.loc[o, ["critical", "fit"]] if o in critical.index else ["-", "-"])]
                    for o in settings
                ],
            ),
            "",
        ]
    lines += _largest_batch_section(chosen, settings, batches[-1], unit)
    directions = Path(results_csv).parent / DIRECTIONS_FILE if directions is None else Path(directions)
    if directions.is_file():
        lines += _directions_section(pd.read_csv(directions))
    edge = chosen.loc[chosen["on_edge"], ["optimizer", "tokens_per_step", "lr"]].drop_duplicates()
    edges = ", ".join(f"{NAMES.get(o, o)} at {int(b):,} ({lr:g})" for o, b, lr in edge.itertuples(index=False))
    variants = VARIANT_OF in chosen.columns and chosen[VARIANT_OF].notna().any()
    scope = " (an optimizer tuned over an option too: its best variant at each batch, of its LRs or the option)"
    lines.append(f"Tuned LRs on the edge of their grid{scope if variants else ''}: {edges or 'none'}.")
    return "\n".join(lines) + "\n"


def _largest_summary(raw: pd.DataFrame, chosen: pd.DataFrame, settings: list[str], largest: int, reference: str) -> str:
    """The run time; one table at the largest batch: each target's steps (EMA, raw) and ratio to ``reference``."""
    targets = [(at_early_target(chosen), _target(raw, "early_target"))] if "steps_to_early_target" in chosen else []
    targets.append((chosen, _target(raw, "target_loss")))
    ema = has_ema(chosen)
    header, columns = ["setting"], []
    for table, target in targets:
        name = target.removeprefix("val loss ")
        header += [f"steps to {name} (EMA)", "raw iterate"] if ema else [f"steps to {name}"]
        columns.append((table, "steps_to_target_raw" if ema else "steps_to_target"))
        header.append(f"ratio at {name}" + (" (raw)" if ema else ""))
    study = reference in _STUDY_NUMBERS
    rows = []
    for o in settings:
        row = [NAMES.get(o, o)]
        for table, value in columns:
            row += [_steps_cell(table, o, largest)] + ([_steps_cell(table, o, largest, value)] if ema else [])
            steps = _medians(table, value)
            ratio = steps.get((o, largest), np.nan) / steps.get((reference, largest), np.nan)
            row.append("-" if o == reference or not np.isfinite(ratio) else f"{ratio:.1f}")
        if study:
            known = o in _STUDY_NUMBERS and o != reference
            row.append(f"{float(_STUDY_NUMBERS[o]) / float(_STUDY_NUMBERS[reference]):.3g}" if known else "-")
        rows.append(row)
    seeds = chosen.groupby(["optimizer", "tokens_per_step"])["seed"].nunique()
    lines = [_timing(raw), ""] if {"started", "finished", "seconds"} <= set(raw.columns) else []
    lines += [
        f"At {largest:,} tokens per step, each setting at its tuned LR: median outer steps over {_count(seeds)} "
        f"seed(s) (min-max), and the ratio to {NAMES.get(reference, reference)}'s median"
        + (", beside the study's steps ratio on its 45M model:" if study else ":"),
        "",
        _table(header + (["study, 45M"] if study else []), rows),
    ]
    return "\n".join(lines) + "\n"


def _target(raw: pd.DataFrame, column: str) -> str:
    """The target's name: "val loss 2.2" when the sweep's ``column`` holds one value, else "the target"."""
    values = raw[column].dropna().unique() if column in raw.columns else []
    return f"val loss {float(values[0]):g}" if len(values) == 1 else "the target"


def _target_sections(
    chosen: pd.DataFrame, settings: list[str], batches: list[int], reference: str, unit: int, target: str
) -> list[str]:
    """Lines of the steps tables (the EMA's and the raw iterate's, where runs have an EMA) and ratios to ``target``."""
    seeds = chosen.groupby(["optimizer", "tokens_per_step"])["seed"].nunique()
    lines = [
        f"Outer steps to {target} at each setting's tuned LR: median over {_count(seeds)} seed(s) (min-max); "
        '"missed" when most seeds did not reach it.',
        "",
        _steps_table(chosen, settings, batches, "steps_to_target"),
        "",
    ]
    ema = has_ema(chosen)
    if ema:
        lines += [
            f"The same on the raw iterate: runs evaluated on an EMA of their iterates read steps to {target} off the "
            "EMA above and off the iterate itself here (the others read the same here as above).",
            "",
            _steps_table(chosen, settings, batches, "steps_to_target_raw"),
            "",
        ]
    lines += _ratio_section(chosen, settings, batches, reference, unit, "")
    if ema:
        lines += _ratio_section(chosen, settings, batches, reference, unit, "_raw")
    return lines + _shares_section(chosen, batches, reference)


def _shares_section(chosen: pd.DataFrame, batches: list[int], reference: str) -> list[str]:
    """Lines of the table of each method's share of ``reference``'s gain over the best first-order method.

    Empty unless the study holds ``reference``, a first-order method and another method
    (:func:`gnlib.experiment.method_comparison.gain_shares`).
    """
    names = set(chosen["optimizer"])
    others = {name.split(" (")[0] for name in names} - {reference, *FIRST_ORDER}
    if reference not in names or not names & set(FIRST_ORDER) or not others:
        return []
    shares = gain_shares(chosen, full=reference).set_index(["method", "tokens_per_step"])
    methods = sorted(others, key=lambda n: (list(NAMES).index(n) if n in NAMES else len(NAMES), n))
    best = shares.reset_index().groupby("tokens_per_step")[["first_order", "first_order_steps"]].first()
    rows = [[NAMES.get(m, m), *[_share_cell(shares, m, b) for b in batches]] for m in methods]
    rows.append(["best first-order (steps)", *[_best_cell(best, b) for b in batches]])
    picked = shares.loc[shares["setting"] != shares.index.get_level_values("method"), "setting"]
    lines = [
        f"Share of {NAMES.get(reference, reference)}'s step reduction over the best first-order method at each "
        "batch, (S_first-order − S) / (S_first-order − S_GN) on median steps: 1 as few steps as full GN, 0 no fewer "
        'than the best of AdamW, Muon and SOAP; "missed (≤ x)" where a method missed the target, x '
        'being the share at the steps its runs took; "-" where it did not run or full GN gained nothing:',
        "",
        _table(["method", *[f"{b:,}" for b in batches]], rows),
        "",
    ]
    if len(picked):
        chosen_variants = ", ".join(f"{s} at {b:,}" for (_, b), s in picked.items())
        rule = "fewest steps, then lowest final loss; options tuned with the LR"
        lines += [f"Variants chosen at each batch ({rule}): {chosen_variants}.", ""]
    return lines


def _variant_lines(chosen: pd.DataFrame) -> list[str]:
    """A line naming, for each optimizer tuned over an option with its LR, the variant chosen at each batch."""
    if "variant" not in chosen.columns:
        return []
    picked = chosen.dropna(subset=["variant"]).drop_duplicates(["optimizer", "tokens_per_step"])
    per_method = [
        f"{NAMES.get(name, name)} "
        + ", ".join(
            f"{variant.partition(' (')[2].removesuffix(')') or 'default options'} at {tokens:,}"
            for variant, tokens in zip(group["variant"], group["tokens_per_step"])
        )
        for name, group in picked.sort_values("tokens_per_step").groupby("optimizer", sort=False)
    ]
    return [f"Options tuned with the LR, the best at each batch: {'; '.join(per_method)}.", ""]


def _directions_section(points: pd.DataFrame) -> list[str]:
    """Lines of the table of each direction's agreement with exact GN beside its method's step-gain share.

    ``points``: notebook 02's ``directions_vs_steps.csv`` (:func:`~gnlib.experiment.method_comparison.
    directions_against_steps`); no lines when it is empty.
    """
    if points.empty:
        return []
    step, tokens = int(points["step"].iloc[0]), int(points["tokens_per_step"].iloc[0])
    rows = [
        [
            row["direction"],
            f"{row['cosine']:.3f}",
            f"{row['reduction_ratio']:.3f}",
            _share_text(row["gain_share"], row["gain_share_at_most"]),
        ]
        for _, row in points.iterrows()
    ]
    return [
        f"Directions against steps: each method's direction at step {step} of notebook 05 (cosine with exact GN's, "
        f"share of the decrease of GN's quadratic model) beside its share of full GN's step gain at {tokens:,} "
        "tokens per step:",
        "",
        _table(["direction", "cosine", "share of GN's decrease", "share of GN's step gain"], rows),
        "",
    ]


def _share_cell(shares: pd.DataFrame, method: str, tokens: int) -> str:
    """A method's share of full GN's gain at one batch: "0.42", "missed (≤ -1.20)", "missed" or "-".

    "missed (≤ x)": x bounds the share by the steps its runs took; "-": not run, or no gain to share.
    """
    if (method, tokens) not in shares.index:
        return "-"
    row = shares.loc[(method, tokens)]
    gain = row["first_order_steps"] - row["full_steps"]
    if np.isnan(gain) or gain <= 0:
        return "-"
    return _share_text(row["gain_share"], row["gain_share_at_most"])


def _share_text(share: float, at_most: float) -> str:
    """A share as "0.42"; a missed target's as "missed (≤ x)" with its bound x, or "missed" without one."""
    if not np.isnan(share):
        return f"{share:.2f}"
    return "missed" if np.isnan(at_most) else f"missed (≤ {at_most:.2f})"


def _best_cell(best: pd.DataFrame, tokens: int) -> str:
    """The best first-order method at one batch and its median steps, e.g. "Muon (30)"."""
    if tokens not in best.index or best.loc[tokens, "first_order"] is None:
        return "-"
    name = best.loc[tokens, "first_order"]
    return f"{NAMES.get(name, name)} ({best.loc[tokens, 'first_order_steps']:g})"


def _ratio_section(
    chosen: pd.DataFrame, settings: list[str], batches: list[int], reference: str, unit: int, suffix: str
) -> list[str]:
    """Lines of the ratio table: each setting's median steps (and cost) over the reference's, per batch.

    ``suffix`` ``"_raw"`` reads the raw iterates. With full GN as the reference, a last column gives the
    study's own ratios on its 45M model (:data:`STUDY_45M_STEPS`: SOAP 5.4, layerwise GN 1.44).
    """
    steps = _medians(chosen, f"steps_to_target{suffix}")
    cost = _medians(chosen, f"grad_equivalents_to_target{suffix}")
    study = {
        o: float(s) / float(_STUDY_NUMBERS[reference]) for o, s in _STUDY_NUMBERS.items() if reference in _STUDY_NUMBERS
    }
    beside = any(o in study for o in settings if o != reference)
    rows = [
        [NAMES.get(o, o), *[_ratio_cell(steps, cost, o, reference, b) for b in batches]]
        + ([f"{study[o]:.3g}" if o in study else "-"] if beside else [])
        for o in settings
        if o != reference
    ]
    if not rows:
        return []
    of = " on the raw iterates" if suffix else ""
    return [
        f"Ratio to {NAMES.get(reference, reference)} of the median steps (and of the cost in gradient steps "
        f"on {unit:,} tokens) to the target{of}"
        + (", beside the study's steps ratio on its 45M model:" if beside else ":"),
        "",
        _table(["setting", *[f"{b:,}" for b in batches], *(["study, 45M"] if beside else [])], rows),
        "",
    ]


def _largest_batch_section(chosen: pd.DataFrame, settings: list[str], largest: int, unit: int) -> list[str]:
    """Lines of the table of steps, tokens, time and cost to target at the largest batch (and the study's).

    Where runs have an EMA, a setting whose raw iterate reads otherwise shows "EMA / raw" in each cell.
    """
    time = time_to_target_column(chosen)
    columns = [
        ("steps_to_target", "g"),
        ("tokens_to_target", ",.0f"),
        (time, ".0f"),
        ("grad_equivalents_to_target", ",.0f"),
    ]
    ema = has_ema(chosen)
    study = any(o in STUDY_45M_STEPS for o in settings)
    seconds = "CPU time (s)" if time.startswith("cpu") else "time (s)"
    header = ["setting", "steps", "tokens", seconds, f"cost (gradient steps on {unit:,} tokens)"]
    rows = [
        [NAMES.get(o, o), *[_ema_and_raw_cell(chosen, o, largest, c, fmt, ema) for c, fmt in columns]]
        + ([STUDY_45M_STEPS.get(o, "-")] if study else [])
        for o in settings
    ]
    beside = (
        ", beside the study's steps on its 45M model past each optimizer's critical batch (docs/study.md)"
        if study
        else ""
    )
    readings = (
        '; "EMA / raw" where a setting is evaluated on an EMA of its iterates: the EMA\'s reading, then the raw '
        "iterate's"
        if ema
        else ""
    )
    return [
        f"To the target at the largest batch ({largest:,} tokens per step), medians over seeds{beside}{readings}:",
        "",
        _table(header + (["study, 45M: steps to 3.25"] if study else []), rows),
        "",
    ]


def _ema_and_raw_cell(chosen: pd.DataFrame, optimizer: str, tokens: int, value: str, fmt: str, ema: bool) -> str:
    """:func:`_median_cell` of ``value``, followed by " / " and the raw iterate's where ``ema`` and they differ."""
    cell = _median_cell(chosen, optimizer, tokens, value, fmt)
    if not ema:
        return cell
    raw_value = f"{value[:-2]}_raw_s" if value.endswith("_s") else f"{value}_raw"
    raw = _median_cell(chosen, optimizer, tokens, raw_value, fmt)
    return cell if raw == cell else f"{cell} / {raw}"


def _timing(raw: pd.DataFrame) -> str:
    """Runs, their wall time (the union of their execution intervals) and their run times summed."""
    timed = raw[["started", "finished"]].dropna()
    intervals = sorted(zip(pd.to_datetime(timed["started"]), pd.to_datetime(timed["finished"])))
    wall, end = 0.0, None
    for start, finish in intervals:
        start = start if end is None else max(start, end)
        wall += max((finish - start).total_seconds(), 0.0)
        end = finish if end is None else max(end, finish)
    ok = int((raw["status"] == "ok").sum())
    return (
        f"{len(raw)} runs ({ok} ok) took {_duration(wall)} of wall time, {_duration(raw['seconds'].sum())} of run "
        "time summed over runs."
    )


def _duration(seconds: float) -> str:
    """E.g. "1 h 05 min", "12 min"."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _medians(chosen: pd.DataFrame, value: str) -> pd.Series:
    """Median of ``value`` per (optimizer, tokens_per_step), a miss as +inf (NaN when most seeds missed)."""
    values = chosen.assign(**{value: chosen[value].astype(float).fillna(np.inf)})
    return values.groupby(["optimizer", "tokens_per_step"])[value].median().replace(np.inf, np.nan)


def _runs(chosen: pd.DataFrame, optimizer: str, tokens: int) -> pd.DataFrame:
    """The tuned-LR runs of one optimizer at one batch (one row per seed)."""
    return chosen.loc[(chosen["optimizer"] == optimizer) & (chosen["tokens_per_step"] == tokens)]


def _steps_table(chosen: pd.DataFrame, settings: list[str], batches: list[int], value: str) -> str:
    """Steps to target (``value``) per setting and tokens per step, as :func:`_steps_cell` writes them."""
    return _table(
        ["setting", *[f"{b:,} tokens/step" for b in batches]],
        [[NAMES.get(o, o), *[_steps_cell(chosen, o, b, value) for b in batches]] for o in settings],
    )


def _steps_cell(chosen: pd.DataFrame, optimizer: str, tokens: int, value: str = "steps_to_target") -> str:
    """Steps over seeds as "12 (10-15)", "12" for one seed, "missed (1/3)" when most missed, "-" when not run."""
    runs = _runs(chosen, optimizer, tokens)[value].astype(float)
    if runs.empty:
        return "-"
    median = runs.fillna(np.inf).median()
    if not np.isfinite(median):
        return f"missed ({runs.notna().sum()}/{len(runs)})"
    low, high = runs.fillna(np.inf).min(), runs.fillna(np.inf).max()
    spread = "" if len(runs) == 1 else f" ({low:g}-{'missed' if not np.isfinite(high) else format(high, 'g')})"
    return f"{median:g}{spread}"


def _ratio_cell(steps: pd.Series, cost: pd.Series, optimizer: str, reference: str, tokens: int) -> str:
    """Steps ratio (cost ratio) to the reference as "3.2 (1.9)"; "-" where either missed or did not run."""
    try:
        ratio = steps[(optimizer, tokens)] / steps[(reference, tokens)]
        cost_ratio = cost[(optimizer, tokens)] / cost[(reference, tokens)]
    except KeyError:
        return "-"
    return "-" if not np.isfinite(ratio) else f"{ratio:.1f} ({cost_ratio:.1f})"


def _median_cell(chosen: pd.DataFrame, optimizer: str, tokens: int, value: str, fmt: str) -> str:
    """The median of ``value`` over the seeds of one setting, formatted; "-" when most missed or not run."""
    median = _medians(_runs(chosen, optimizer, tokens), value)
    return "-" if median.empty or not np.isfinite(median.iloc[0]) else format(float(median.iloc[0]), fmt)


def _count(seeds: pd.Series) -> str:
    """The number of seeds per setting, "2-3" when it varies."""
    low, high = int(seeds.min()), int(seeds.max())
    return str(low) if low == high else f"{low}-{high}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
