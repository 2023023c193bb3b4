"""Conformance of ``protocol="paper"`` with the reference code, setting by setting.

One table of (optimizer, setting, reference value, reference file:line, how to read the setting off what
``protocol="paper"`` builds), on the reference architecture (``paper_tiny``, made smaller). Every value is
read from the objects a run uses (the optimizer ``gnlib.experiment.runs`` builds for the spec, its param groups,
inner optimizers, clipping hooks, the evaluation schedule the run is given), never from the protocol's
constants; where a mechanism carries the setting, the row reads what the mechanism does: the EMA's
arithmetic over three outer steps, the warm-start iterate (1 − α)Δ̂, the α the line search takes when
every α raises the loss, the tensors weight decay moves (all set non-zero first), the clipped norms.
The same table read off ``protocol="gnlib"`` must differ exactly on the rows listed in
:data:`GNLIB_DIFFERS`, gnlib's documented, deliberate differences, and a drift of each kind of row
fails it (:func:`test_a_drifted_setting_fails_its_row`).

Files (docs/study.md, section "Reference configuration"; full-gauss-newton at 0c14e7e): gn.py =
EasyLM/models/llama/llama_train_gn.py, lw.py = .../llama_train_gn_layerwise.py, opt = EasyLM/optimizers.py,
tpl = templates/gn-template.sbatch, atpl = templates/adam-template.sbatch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import papermill
import pytest
import torch
import yaml
from torch.func import functional_call

from gnlib.experiment import protocols
from gnlib.experiment.protocols import resolve
from gnlib.experiment.runs import RunSpec, build_run, run
from gnlib.losses import CrossEntropy
from gnlib.models import PRESETS
from gnlib.optim.factory import clip_gradients

N = 3  # inner steps of the miniature (the reference's N = 122)
MODEL = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}


@dataclasses.dataclass
class Built:
    """What a run of ``spec`` is made of."""

    spec: RunSpec
    model: torch.nn.Module
    optimizer: Any
    val: list
    schedule: Callable[[int], bool] | None
    eval_every: int


def _build_run(optimizer: str, protocol: str, **fields: Any) -> Built:
    gn = optimizer.startswith("gn")
    spec = RunSpec(
        optimizer=optimizer,
        preset="paper_tiny",
        lr=0.01,
        steps=20,
        batch_size=4,
        seq_len=16,
        protocol=protocol,
        model_overrides=MODEL,
        hyperparameters={"inner_steps": N} if gn else {},
        **fields,
    )
    spec.validate()
    built = build_run(spec)
    resolved = resolve(spec)
    return Built(spec, built.model, built.optimizer, built.val, resolved.eval_schedule, resolved.eval_every)


# ------------------------------------------------------------------------------------ readers


def _inner(built: Built, part: str) -> dict:
    """The first param group of the first inner ``part`` ("muon" / "adamw") optimizer among the blocks."""
    inner = (block.optimizer.optimizers for block in built.optimizer._blocks.values())
    return next(optimizers[part] for optimizers in inner if part in optimizers).param_groups[0]


def _inner_split(built: Built) -> tuple[set[str], list[str]]:
    """Full GN's inner optimizers ("muon", "adamw"; a lone solver by its class) and the matrices AdamW takes."""
    inner = built.optimizer._blocks["full"].optimizer
    parts = getattr(inner, "optimizers", {type(inner).__name__.lower(): inner})
    adamw = {n for g in parts["adamw"].param_groups for n in g["param_names"]} if "adamw" in parts else set()
    return set(parts), sorted(n for n in adamw if built.model.get_parameter(n).dim() == 2)


def _decayed(built: Built) -> set[str]:
    """Tensors the inner loop decays: one inner update with a zero gradient moves exactly those (by -lr·wd·θ).

    The anchor is all ones, so a tensor that starts at zero (a LayerNorm bias) shows its decay too.
    """
    gn = built.optimizer
    anchor = {n: torch.ones_like(p) for n, p in built.model.named_parameters()}
    moved = set()
    for block in gn._blocks.values():
        gn._inner_update(block, {n: torch.zeros_like(t) for n, t in block.delta.items()}, anchor, 1.0)
        moved |= {n for n, t in block.delta.items() if torch.count_nonzero(t) > 0}
        gn._reset_inner(block, gn.param_groups[0]["initial_lr"])
    return moved


def _inner_clip_groups(built: Built) -> list[set[str]]:
    """Groups of tensors the inner loop clips together.

    A gradient of norm 1e3 on one tensor (1e-9 elsewhere) shrinks exactly the tensors of its group.
    """
    gn = built.optimizer
    groups = []
    for block in gn._blocks.values():
        for probe in block.names:
            if any(probe in g for g in groups):
                continue
            grads = {n: torch.full_like(t, 1e-9) for n, t in block.delta.items()}
            grads[probe] = torch.full_like(block.delta[probe], 1e3)
            for n, t in block.delta.items():
                t.grad = grads[n].clone()
            clipped = {n: t.grad.clone() for n, t in block.delta.items()}
            clip_gradients([[block.delta[n] for n in g] for g in block.clip_groups], gn.grad_clip)
            groups.append({n for n, t in block.delta.items() if not torch.equal(t.grad, clipped[n])})
            for t in block.delta.values():
                t.grad = None
    return groups


def _clipped_norms(built: Built, named_groups: list[list[str]]) -> list[float]:
    """Per-group gradient norms after a baseline's step on gradients of norm 1e3 (LR 0: parameters kept)."""
    opt, model = built.optimizer, built.model
    for group in opt.param_groups:
        group["lr"] = 0.0
    inputs, targets = built.val[0]
    opt.zero_grad()
    (1e3 * CrossEntropy().value(model(inputs), targets)).backward()
    opt.step()
    params = dict(model.named_parameters())
    return [float(torch.linalg.vector_norm(torch.stack([params[n].grad.norm() for n in g]))) for g in named_groups]


def _baseline_group(built: Built, tag: str) -> dict:
    return next(g for g in built.optimizer.param_groups if g.get("optimizer", tag) == tag)


def _params(built: Built) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in built.model.named_parameters()}


def _fresh(built: Built) -> Built:
    """The same run built anew, for a reader that trains it or changes it."""
    return _build_run(built.spec.optimizer, built.spec.protocol)


def _ema_decay(built: Built) -> float | str | None:
    """β read off the EMA after one outer step, ema₁ = βθ₀ + (1 − β)θ₁, then checked over two more steps.

    β is the least-squares solution over every tensor (float64); rounded to 4 decimals, since float32
    iterates carry rounding of order eps·|θ| into it. None when the run evaluates the raw iterate;
    "inconsistent" when steps 2 and 3 break ema_k = β ema_{k−1} + (1 − β)θ_k by more than 1% of ema_k − θ_k.
    """
    built = _fresh(built)
    gn = built.optimizer
    if gn.eval_parameters() is None:
        return None

    def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].double().flatten() for n in sorted(tensors)])

    iterates, emas = [flat(_params(built))], []
    for _ in range(3):
        gn.step()
        iterates.append(flat(_params(built)))
        emas.append(flat(gn.eval_parameters()))
    moved = iterates[0] - iterates[1]
    beta = float((emas[0] - iterates[1]) @ moved / (moved @ moved))
    expected = iterates[0]
    for step in range(1, 4):
        expected = beta * expected + (1 - beta) * iterates[step]
        if (emas[step - 1] - expected).norm() > 1e-2 * (expected - iterates[step]).norm():
            return "inconsistent"
    return round(beta, 4)


def _warm_start(built: Built) -> str:
    """What the next inner loop starts from, after one outer step whose line search can only take α = 1/2.

    θ_{t+1} = θ_t + αΔ̂, so the pre-line-search iterate is Δ̂ = (θ_{t+1} − θ_t)/α; the reference starts the
    next inner loop at θ̂ − θ_{t+1} = (1 − α)Δ̂ with the inner optimizer's state kept.
    """
    built = _fresh(built)
    gn = built.optimizer
    gn.line_search = (0.5,)  # the line search's only choice: α = 1/2
    before = _params(built)
    gn.step()
    after = _params(built)
    start = {n: t.detach() for block in gn._blocks.values() for n, t in block.delta.items()}
    if all(torch.count_nonzero(t) == 0 for t in start.values()):
        return "cold (Δ = 0)"
    alpha = 0.5
    hat = {n: (after[n] - before[n]) / alpha for n in start}
    # float32 iterates: θ_{t+1} − θ_t carries rounding of order eps·|θ|, so the tensors are compared in norm
    warm = all((start[n] - (1 - alpha) * hat[n]).norm() <= 1e-3 * start[n].norm() for n in start)
    return "(1 − α)Δ̂" if warm else "other"


def _uphill_line_search(built: Built) -> str:
    """The α the line search takes along the solved direction reversed, where every α raises the loss.

    The line-search batches are recorded and the loss at θ_t + αd recomputed for every α of the grid.
    """
    built = _fresh(built)
    gn, drawn = built.optimizer, []
    source, search = gn.batches, gn._line_search

    def record():
        drawn.append(source())
        return drawn[-1]

    def reversed_search(anchor, direction, batches, cost):
        reversed_search.direction = {n: -d for n, d in direction.items()}
        return search(anchor, reversed_search.direction, batches, cost)

    gn.batches, gn._line_search = record, reversed_search
    anchor = _params(built)
    alpha = gn.step()["alpha"]
    batches, d = drawn[-gn.line_search_batches :], reversed_search.direction

    def loss(a: float) -> float:
        point = {n: anchor[n] + a * d[n] for n in anchor}
        return sum(float(CrossEntropy().value(functional_call(built.model, point, (x,)), y)) for x, y in batches)

    losses = {a: loss(a) for a in gn.line_search}
    if min(losses.values()) <= loss(0.0):
        return "not uphill"
    if alpha == 0:
        return "rejected (α = 0)"
    return "argmin" if math.isclose(alpha, min(losses, key=losses.get)) else f"α = {alpha}"


HEAD = ["embed.weight", "head.weight"]


def _hidden(built: Built) -> list[str]:
    return [n for n, _ in built.model.named_parameters() if n not in HEAD]


def _gains(built: Built) -> set[str]:
    """The 1-D tensors: norm gains and biases."""
    return {n for n, p in built.model.named_parameters() if p.dim() == 1}


def _matrices(built: Built) -> list[str]:
    return [n for n, p in built.model.named_parameters() if p.dim() >= 2]


def _grid(n: int) -> tuple[float, ...]:
    return tuple(round(2 ** (-i / 2), 12) for i in range(n))


# (optimizer, setting, reference value, where in the reference code, reader of the built run)
TABLE: list[tuple[str, str, Any, str, Callable[[Built], Any]]] = [
    # ---- GN (full)
    ("gn", "objective", "gn", "tpl:88 (gauss_newton=True); gn.py:452-479", lambda b: b.optimizer.objective),
    (
        "gn",
        "inner solver: Muon on hidden, AdamW on embedding+head",
        ({"muon", "adamw"}, sorted(HEAD)),
        "gn.py:315-374",
        _inner_split,
    ),
    (
        "gn",
        "inner Muon momentum",
        0.95,
        "gn.py:327-335 (optax.contrib.muon, beta default 0.95)",
        lambda b: _inner(b, "muon")["momentum"],
    ),
    ("gn", "inner Muon Nesterov", True, "optax.contrib.muon nesterov=True", lambda b: _inner(b, "muon")["nesterov"]),
    (
        "gn",
        "inner Muon bias correction",
        True,
        "optax.contrib.muon (scale_by_muon bias correction)",
        lambda b: _inner(b, "muon")["bias_correction"],
    ),
    (
        "gn",
        "inner Muon Newton-Schulz",
        ((3.4445, -4.775, 2.0315), 5),
        "optax.contrib.muon ns_coeffs, ns_steps",
        lambda b: (tuple(round(c, 4) for c in _inner(b, "muon")["ns_coefficients"]), _inner(b, "muon")["ns_steps"]),
    ),
    (
        "gn",
        "inner AdamW betas",
        (0.9, 0.999),
        "tpl:58-59 (inner_b1, inner_b2)",
        lambda b: tuple(_inner(b, "adamw")["betas"]),
    ),
    ("gn", "inner AdamW eps", 1e-8, "optax.adamw default eps", lambda b: _inner(b, "adamw")["eps"]),
    (
        "gn",
        "one LR for Muon and AdamW parts",
        1.0,
        "gn.py:315-335 (one lr_sched)",
        lambda b: _inner(b, "adamw")["lr_ratio"],
    ),
    (
        "gn",
        "inner schedule",
        "cosine",
        "tpl:51 (constant_with_inner_cosine); gn.py:248-285",
        lambda b: b.optimizer.inner_schedule,
    ),
    ("gn", "inner weight decay", 1e-3, "tpl:57 (optimizer_wd=0.001)", lambda b: b.optimizer.weight_decay),
    (
        "gn",
        "decayed tensors: embedding, head, gains",
        "adamw+gains",
        "gn.py:315-335 (adamw wd; muon adam_weight_decay)",
        lambda b: "adamw+gains" if _decayed(b) == set(HEAD) | _gains(b) else sorted(_decayed(b)),
    ),
    ("gn", "proximal penalty", 0.0, "tpl:55 (inner_loop_wd=0)", lambda b: b.optimizer.prox),
    ("gn", "inner clipping norm", 1.0, "tpl:60 (inner_clip_gradient=1)", lambda b: b.optimizer.grad_clip),
    (
        "gn",
        "inner clipping groups",
        "embedding+head | hidden",
        "gn.py:316-335 (clip_by_global_norm per chain)",
        lambda b: (
            "embedding+head | hidden"
            if _inner_clip_groups(b) == [set(HEAD), set(_hidden(b))]
            else [sorted(g) for g in _inner_clip_groups(b)]
        ),
    ),
    ("gn", "warm start from (1 − α)Δ̂", "(1 − α)Δ̂", "gn.py:718-732, 800", _warm_start),
    (
        "gn",
        "line-search grid",
        _grid(5),
        "tpl:64 (ls_range=5); gn.py:777",
        lambda b: tuple(round(a, 12) for a in b.optimizer.line_search),
    ),
    (
        "gn",
        "line-search batches = N",
        N,
        "gn.py:763-770 (inner_loop_iter new batches)",
        lambda b: b.optimizer.line_search_batches,
    ),
    ("gn", "line search takes the argmin, even uphill", "argmin", "gn.py:788", _uphill_line_search),
    ("gn", "EMA of outer iterates, evaluated", 0.999, "tpl:61-62; gn.py:809-811, 833-836", _ema_decay),
    # ---- layerwise GN
    (
        "gn_layerwise",
        "blocks",
        ["embed", "block0", "block1", "head"],
        "lw.py:410-414",
        lambda b: list(b.optimizer._blocks),
    ),
    (
        "gn_layerwise",
        "final norm joins the last block",
        (True, ["head.weight"]),
        "lw.py:410-414",
        lambda b: ("norm.weight" in b.optimizer._blocks["block1"].names, b.optimizer._blocks["head"].names),
    ),
    (
        "gn_layerwise",
        "line-search grid",
        _grid(10),
        "lw.py:110 (ls_range=10)",
        lambda b: tuple(round(a, 12) for a in b.optimizer.line_search),
    ),
    (
        "gn_layerwise",
        "line search takes the argmin, even uphill",
        "argmin",
        "lw.py (as gn.py:788)",
        _uphill_line_search,
    ),
    ("gn_layerwise", "inner weight decay", 1e-3, "tpl:57", lambda b: b.optimizer.weight_decay),
    ("gn_layerwise", "EMA", 0.999, "tpl:61-62", _ema_decay),
    (
        "gn_layerwise",
        "inner Muon bias correction",
        True,
        "optax.contrib.muon",
        lambda b: _inner(b, "muon")["bias_correction"],
    ),
    # ---- GN-prox-linear
    ("gn_prox", "objective", "prox_linear", "gn.py:396-415", lambda b: b.optimizer.objective),
    ("gn_prox", "line search takes the argmin, even uphill", "argmin", "gn.py:759-807", _uphill_line_search),
    ("gn_prox", "line-search batches = N", N, "gn.py:763-770", lambda b: b.optimizer.line_search_batches),
    (
        "gn_prox",
        "inner clipping groups",
        "embedding+head | hidden",
        "gn.py:316-335",
        lambda b: "embedding+head | hidden" if _inner_clip_groups(b) == [set(HEAD), set(_hidden(b))] else "other",
    ),
    ("gn_prox", "EMA", 0.999, "tpl:61-62", _ema_decay),
    # ---- AdamW baseline
    ("adamw", "betas", (0.9, 0.95), "atpl:60-61", lambda b: tuple(b.optimizer.param_groups[0]["betas"])),
    ("adamw", "weight decay", 0.0, "atpl:54", lambda b: b.optimizer.param_groups[0]["weight_decay"]),
    (
        "adamw",
        "gradient clipping (global norm)",
        1.0,
        "opt:398, 436 (AdamW factory clip_gradient=1.0)",
        lambda b: round(_clipped_norms(b, [[n for n, _ in b.model.named_parameters()]])[0], 4),
    ),
    # ---- Muon baseline
    ("muon", "momentum", 0.95, "opt:89 (beta=0.95)", lambda b: _baseline_group(b, "muon")["momentum"]),
    (
        "muon",
        "Nesterov with bias correction",
        (True, True),
        "opt:141-150 (optax.contrib.muon)",
        lambda b: (_baseline_group(b, "muon")["nesterov"], _baseline_group(b, "muon")["bias_correction"]),
    ),
    (
        "muon",
        "AdamW part at the same LR",
        True,
        "opt:129-150 (one learning_rate_schedule)",
        lambda b: _baseline_group(b, "adamw")["lr"] == _baseline_group(b, "muon")["lr"] == b.spec.lr,
    ),
    (
        "muon",
        "AdamW part weight decay",
        1e-4,
        "opt:91 (weight_decay=1e-4)",
        lambda b: _baseline_group(b, "adamw")["weight_decay"],
    ),
    ("muon", "AdamW part betas", (0.9, 0.95), "opt:87-88", lambda b: tuple(_baseline_group(b, "adamw")["betas"])),
    (
        "muon",
        "Muon matrices weight decay",
        0.0,
        "opt:143-150 (muon weight_decay default 0)",
        lambda b: _baseline_group(b, "muon")["weight_decay"],
    ),
    (
        "muon",
        "clipping per group",
        (1.0, 1.0),
        "opt:90, 130, 142",
        lambda b: tuple(round(v, 4) for v in _clipped_norms(b, [HEAD, _hidden(b)])),
    ),
    # ---- SOAP baseline
    ("soap", "betas", (0.9, 0.95), "opt:210-211", lambda b: tuple(b.optimizer.param_groups[0]["betas"])),
    ("soap", "weight decay", 1e-4, "opt:213", lambda b: b.optimizer.param_groups[0]["weight_decay"]),
    ("soap", "precondition every", 10, "opt:216", lambda b: b.optimizer.param_groups[0]["precondition_frequency"]),
    (
        "soap",
        "clipping per chain: ≥2-D | 1-D",
        (1.0, 1.0),
        "opt:212, 271 (clip_by_global_norm in the SOAP chain and in the 1-D AdamW chain)",
        lambda b: tuple(round(v, 4) for v in _clipped_norms(b, [_matrices(b), sorted(_gains(b))])),
    ),
    # ---- evaluation (any optimizer)
    (
        "gn",
        "evaluations after updates (20-step run; logged one lower)",
        [1, 11, *range(12, 21)],
        "gn.py:825 (loop index i: i % eval_freq == 0 and i <= steps/2, or i > steps/2); tpl:38-39",
        lambda b: [s for s in range(1, 21) if (b.schedule(s) if b.schedule else s % b.eval_every == 0)],
    ),
    (
        "adamw",
        "evaluations after updates (20-step run)",
        list(range(1, 21)),
        "atpl:42 (eval_freq=1)",
        lambda b: [s for s in range(1, 21) if (b.schedule(s) if b.schedule else s % b.eval_every == 0)],
    ),
]

#: Rows where gnlib's protocol deliberately differs from the reference (documented in gnlib.experiment.protocols).
GNLIB_DIFFERS = {
    ("gn", "inner Muon bias correction"),
    ("gn", "inner weight decay"),
    ("gn", "decayed tensors: embedding, head, gains"),
    ("gn", "inner clipping groups"),
    ("gn", "line-search batches = N"),
    ("gn", "line search takes the argmin, even uphill"),
    ("gn", "EMA of outer iterates, evaluated"),
    ("gn_layerwise", "final norm joins the last block"),
    ("gn_layerwise", "line-search grid"),
    ("gn_layerwise", "line search takes the argmin, even uphill"),
    ("gn_layerwise", "inner weight decay"),
    ("gn_layerwise", "EMA"),
    ("gn_layerwise", "inner Muon bias correction"),
    ("gn_prox", "line search takes the argmin, even uphill"),
    ("gn_prox", "line-search batches = N"),
    ("gn_prox", "inner clipping groups"),
    ("gn_prox", "EMA"),
    ("adamw", "weight decay"),
    ("adamw", "gradient clipping (global norm)"),
    ("muon", "Nesterov with bias correction"),
    ("muon", "AdamW part at the same LR"),
    ("muon", "AdamW part weight decay"),
    ("muon", "clipping per group"),
    ("soap", "betas"),
    ("soap", "weight decay"),
    ("soap", "clipping per chain: ≥2-D | 1-D"),
    ("gn", "evaluations after updates (20-step run; logged one lower)"),
    ("adamw", "evaluations after updates (20-step run)"),
}


def _read(protocol: str) -> dict[tuple[str, str], Any]:
    built: dict[str, Built] = {}
    values = {}
    for optimizer, setting, _, _, reader in TABLE:
        if optimizer not in built:
            built[optimizer] = _build_run(optimizer, protocol)
        values[(optimizer, setting)] = reader(built[optimizer])
    return values


@pytest.fixture(scope="module")
def paper_values():
    return _read("paper")


@pytest.mark.parametrize(
    ("optimizer", "setting", "reference", "where"),
    [row[:4] for row in TABLE],
    ids=[f"{row[0]}: {row[1]}" for row in TABLE],
)
def test_paper_protocol_builds_the_reference_setting(paper_values, optimizer, setting, reference, where):
    built = paper_values[(optimizer, setting)]
    assert built == reference, f"{optimizer} {setting}: built {built!r}, reference {reference!r} ({where})"


def test_gnlib_protocol_differs_exactly_where_documented():
    values = _read("gnlib")
    differs = {(o, s) for o, s, reference, _, _ in TABLE if values[(o, s)] != reference}
    assert differs == GNLIB_DIFFERS


def test_paper_validation_set_at_the_study_scale_is_100_by_128_by_1024_tokens():
    spec = RunSpec(optimizer="gn", preset="paper45m", batch_size=32, seq_len=1024, protocol="paper")
    resolved = resolve(spec)
    assert resolved.val_batches * spec.batch_size * spec.seq_len == 100 * 128 * 1024  # gn.py:830; tpl:40, 82


def test_explicit_options_override_the_protocol_and_are_recorded():
    spec = RunSpec(
        optimizer="gn",
        lr=0.01,
        steps=2,
        batch_size=4,
        seq_len=16,
        protocol="paper",
        eval_every=1,
        model_overrides=MODEL,
        hyperparameters={
            "inner_steps": 2,
            "ema": None,
            "line_search_batches": 1,
            "solver_options": {"bias_correction": False},
        },
    )
    spec.validate()
    gn = build_run(spec).optimizer
    assert gn.ema is None and gn.line_search_batches == 1 and gn.line_search_accept == "argmin"
    record = run(spec, progress=False).metadata["protocol"]
    assert record["protocol"] == "paper"
    assert record["overridden"] == {
        "ema": {"protocol": 0.999, "given": None},
        "line_search_batches": {"protocol": None, "given": 1},
        "solver_options.bias_correction": {"protocol": True, "given": False},
        "eval_every": {"protocol": 10, "given": 1},
    }
    assert record["from_protocol"]["line_search_accept"] == "argmin" and record["from_protocol"]["weight_decay"] == 1e-3
    assert "inner_steps" not in record["from_protocol"]


def test_unknown_protocol_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"protocol='reference' is invalid; allowed: one of \['gnlib', 'paper'\]"):
        RunSpec(protocol="reference").validate()
    with pytest.raises(ValueError, match="unknown option"):  # an option unknown to the optimizer, as under gnlib
        RunSpec(optimizer="gn", protocol="paper", hyperparameters={"betas": (0.9, 0.9)}).validate()


def test_paper_protocol_miniature_runs_end_to_end():
    """A CPU miniature of the study under protocol="paper": GN, layerwise GN and Muon, 4 outer steps."""
    for optimizer in ("gn", "gn_layerwise", "muon"):
        gn = optimizer.startswith("gn")
        spec = RunSpec(
            optimizer=optimizer,
            lr=0.01,
            steps=4,
            batch_size=4,
            seq_len=16,
            protocol="paper",
            model_overrides=MODEL,
            hyperparameters={"inner_steps": 2} if gn else {},
        )
        history = run(spec, progress=False)
        assert history.status == "completed" and history.metadata["protocol"]["overridden"] == {}
        evaluated = history.evaluations()
        # GN: after update 1 (loop index 0), then after every update past half the run; baselines: every update
        assert evaluated["step"].tolist() == ([0, 1, 4] if gn else [0, 1, 2, 3, 4])
        assert ("val_loss_raw" in evaluated) == gn
        last = history.rows[-1]
        if gn:  # validation on the EMA (0.999: still near θ_0), the raw iterate beside it
            assert last["val_loss_raw"] < last["val_loss"] < history.rows[0]["val_loss"]
            assert sum(r["alpha"] > 0 for r in history.rows[1:]) == 4  # the argmin is always taken
            assert history.rows[1]["tokens"] == 2 * 2 * 4 * 16  # N inner + N line-search batches
        else:
            assert "val_loss_raw" not in last and last["val_loss"] < history.rows[0]["val_loss"]


def test_paper_grids_run_the_paper_protocol_with_known_parameters():
    root = Path(__file__).resolve().parents[2]
    grids = sorted((root / "notebooks" / "grids").glob("paper*_study.yaml"))
    assert grids
    for path in grids:
        grid = yaml.safe_load(path.read_text())
        assert grid["parameters"]["protocol"] == "paper", path.name
        known = papermill.inspect_notebook(str(root / grid["notebook"]))
        unknown = sorted((set(grid["parameters"]) | set(grid["grid"])) - set(known))
        assert not unknown, f"{path.name}: {unknown} are not parameters of {grid['notebook']}"


def _row(optimizer: str, setting: str) -> tuple[Any, Callable[[Built], Any]]:
    return next((reference, reader) for o, s, reference, _, reader in TABLE if (o, s) == (optimizer, setting))


# (row, what drifts in the paper protocol: an option of PAPER_OPTIONS[optimizer], or a protocol constant)
DRIFTS = [
    (("gn", "inner weight decay"), {"weight_decay": 1e-2}),
    (("gn", "decayed tensors: embedding, head, gains"), {"weight_decay_scope": "all"}),
    (("gn", "inner clipping groups"), {"grad_clip_per": "block"}),
    (("gn", "warm start from (1 − α)Δ̂"), {"warm_start": False}),
    (("gn", "line-search grid"), {"line_search": _grid(4)}),
    (("gn", "line search takes the argmin, even uphill"), {"line_search_accept": "decrease"}),
    (("gn", "EMA of outer iterates, evaluated"), {"ema": 0.99}),
    (("gn", "EMA of outer iterates, evaluated"), {"ema": None}),
    (("soap", "clipping per chain: ≥2-D | 1-D"), {"grad_clip": 2.0}),
    (("muon", "AdamW part weight decay"), {"adamw_weight_decay": 0.0}),
    (("gn", "evaluations after updates (20-step run; logged one lower)"), {"PAPER_EVAL_EVERY": 5}),
    (("gn", "inner solver: Muon on hidden, AdamW on embedding+head"), {"solver": "adamw", "solver_options": None}),
    (("gn_layerwise", "final norm joins the last block"), {"blocks": "per_layer"}),
    (("gn_layerwise", "line-search grid"), {"line_search": _grid(5)}),
]


@pytest.mark.parametrize(
    ("row", "drift"),
    DRIFTS,
    ids=[f"{r[0]}: {r[1]} <- " + ", ".join(f"{k}={v!r}" for k, v in d.items()) for r, d in DRIFTS],
)
def test_a_drifted_setting_fails_its_row(monkeypatch, row, drift):
    """Each kind of row reads the setting through what the run does, so a drift of it changes the reading."""
    for name, value in drift.items():
        if name.isupper():
            monkeypatch.setattr(protocols, name, value)
        else:
            monkeypatch.setitem(protocols.PAPER_OPTIONS[row[0]], name, value)
    reference, reader = _row(*row)
    assert reader(_build_run(row[0], "paper")) != reference


def test_every_preset_has_a_paper_validation_set_its_size_affords():
    assert set(protocols.PAPER_VAL_SEQUENCES) == set(PRESETS)
    built = _build_run("gn", "paper")
    assert sum(x.shape[0] for x, _ in built.val) == protocols.PAPER_VAL_SEQUENCES["paper_tiny"] == 128


#: The study's grids: what the reference runs (docs/study.md, "Reference configuration"; tpl, atpl).
PAPER_GRID_VALUES = {
    "protocol": "paper",
    "model_overrides": {},
    "corpus": "hf:allenai/c4:en",
    "tokenizer": "t5",
    "data": "stream",
    "data_epochs": 1,
    "batch_size": 32,
    "seq_len": 1024,
    "warmup_steps": 1000,
    "target_loss": 3.25,
    "eval_every": 0,
    "val_batches": 0,
}


@pytest.mark.parametrize("preset", ["paper45m", "paper150m"])
def test_paper_grids_hold_the_reference_values(preset):
    root = Path(__file__).resolve().parents[2]
    grid = yaml.safe_load((root / "notebooks" / "grids" / f"{preset}_study.yaml").read_text())
    parameters = grid["parameters"]
    assert {key: parameters.get(key) for key in PAPER_GRID_VALUES} == PAPER_GRID_VALUES
    assert parameters["preset"] == preset
    assert max(grid["grid"]["micro_batches"]) == 122  # tpl:41: N = 122 inner steps of 32 × 1024 tokens
    assert set(grid["grid"]["optimizers"]) >= {"adamw", "muon", "soap", "gn", "gn_layerwise"}


@pytest.mark.parametrize("optimizer", ["gn", "adamw"])
def test_a_setting_the_user_gave_wins_even_at_the_old_default(optimizer):
    """eval_every=10 and val_batches=8 given under the paper protocol are used, not read as "unset"."""
    spec = RunSpec(
        optimizer=optimizer, preset="paper_tiny", protocol="paper", batch_size=4, eval_every=10, val_batches=8
    )
    resolved = resolve(spec)
    assert (resolved.val_batches, resolved.eval_every) == (8, 10)
    unset = resolve(dataclasses.replace(spec, eval_every=None, val_batches=None))
    assert unset.val_batches == 128 // 4 and unset.eval_every == (10 if optimizer == "gn" else 1)
    assert "val_batches" in resolved.record["overridden"] and "val_batches" in unset.record["from_protocol"]
