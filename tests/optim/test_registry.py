"""The optimizer registry: one schema and one constructor per name, options checked without building a model."""

import dataclasses
import re

import pytest
import torch

import gnlib.experiment.runs
from gnlib.experiment.runs import RunSpec
from gnlib.models import build_model
from gnlib.optim import DEFAULTS, GaussNewton, GaussNewtonOptions
from gnlib.optim.kfac_optimizer import KFAC
from gnlib.optim.registry import OPTIMIZERS, REGISTRY, build_optimizer, validate_options
from gnlib.optim.soap import SOAP

TINY = dict(d_model=16, n_layers=1, n_heads=2, d_ff=16, vocab_size=32, max_seq_len=16)


def _batches():
    gen = torch.Generator().manual_seed(0)
    return lambda: (torch.randint(0, 32, (2, 8), generator=gen), torch.randint(0, 32, (2, 8), generator=gen))


def test_every_name_has_one_schema_and_builds_with_its_defaults():
    assert OPTIMIZERS == (
        "adamw",
        "muon",
        "soap",
        "sgd",
        "shampoo",
        "psgd",
        "kfac",
        "gn",
        "gn_prox",
        "gn_layerwise",
        "gn_cg",
    )
    for name in OPTIMIZERS:
        model = build_model("tiny", seed=0, **TINY)
        options = validate_options(name, 0.01, {})
        assert set(options) == set(REGISTRY[name].schema.defaults)
        optimizer = build_optimizer(name, model, _batches(), 0.01, {}, accumulation=3)
        if name == "kfac":
            assert optimizer.options["lr"] == 0.01 and optimizer.options["micro_batches"] == 3
        else:
            assert optimizer.param_groups[0]["initial_lr"] == 0.01
        assert isinstance(optimizer, (GaussNewton, KFAC)) == REGISTRY[name].draws_batches


def test_defaults_are_those_the_constructors_use():
    model = build_model("tiny", seed=0, **TINY)
    built = GaussNewton(model, _batches())
    for name in ("gn", "gn_prox", "gn_layerwise", "gn_cg"):
        defaults = REGISTRY[name].schema.defaults
        assert defaults["inner_steps"] == built.inner_steps == GaussNewtonOptions().inner_steps == 8
        assert defaults["line_search_batches"] == built.line_search_batches == 2
    assert REGISTRY["gn_cg"].schema.defaults["solver"] == "cg"
    assert REGISTRY["gn_layerwise"].schema.defaults["blocks"] == "per_layer"
    soap = SOAP(model.parameters())
    assert DEFAULTS["soap"]["precondition_frequency"] == soap.defaults["precondition_frequency"] == 10
    assert DEFAULTS["adamw"] == dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=None)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("gn", {"inner_steps": 0}, "optimizer 'gn': inner_steps=0 is invalid; allowed: an integer >= 1"),
        ("gn", {"inner_steps": True}, "optimizer 'gn': inner_steps=True is invalid; allowed: an integer >= 1"),
        ("gn_cg", {"cg_iters": False}, "optimizer 'gn_cg': cg_iters=False is invalid; allowed: an integer >= 1"),
        ("gn", {"line_search_batches": True}, "line_search_batches=True is invalid"),
        ("muon", {"ns_steps": True}, "optimizer 'muon': ns_steps=True is invalid; allowed: an integer in [1, 99]"),
        ("soap", {"precondition_frequency": True}, "precondition_frequency=True is invalid; allowed: an integer >= 1"),
        ("adamw", {"weight_decay": True}, "weight_decay=True is invalid; allowed: a finite number >= 0"),
        ("gn", {"ema": "0.9"}, "ema='0.9' is invalid; allowed: None or a number in (0, 1) (a string: in YAML write"),
        ("adamw", {"eps": "1e-8"}, "eps='1e-8' is invalid; allowed: a finite number >= 0 (a string"),
        ("gn", {"solver": "lbfgs"}, "solver='lbfgs' is invalid; allowed: one of ['muon', 'adamw', 'sgd', 'cg']"),
        ("gn_cg", {"solver": "muon"}, "solver='muon' is invalid; allowed: 'cg' ('gn_cg' fixes solver"),
        ("gn_layerwise", {"blocks": "full"}, "'per_layer' or 'per_layer_norm_with_last' ('gn_layerwise' fixes"),
        ("gn", {"damping": 1.0}, "damping=1.0 is invalid; allowed: None, or a finite number >= 0 with solver='cg'"),
        ("gn", {"solver": "adamw", "solver_options": {"momentum": 0.9}}, "optimizer 'adamw' got unknown option(s)"),
        ("gn", {"inner_iters": 3}, "optimizer 'gn' got unknown option(s) ['inner_iters']; allowed: ["),
        ("sgd", {"lr": 0.1}, "lr is set by the run's lr"),
    ],
)
def test_bad_options_name_the_option_and_the_allowed_values(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_options(name, 0.01, options)


def test_bool_lr_and_string_lr_are_refused_everywhere():
    for name in OPTIMIZERS:
        for lr in (True, "1e-3"):
            with pytest.raises(ValueError, match=re.escape(f"lr={lr!r} is invalid")):
                validate_options(name, lr, {})


def test_runspec_validation_builds_no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("validation built a model")

    monkeypatch.setattr(gnlib.experiment.runs, "build_model", refuse)
    spec = RunSpec(optimizer="gn_layerwise", steps=2, hyperparameters={"inner_steps": 2, "solver": "adamw"})
    spec.validate()
    with pytest.raises(ValueError, match=re.escape("optimizer 'gn_layerwise': inner_steps=True is invalid")):
        dataclasses.replace(spec, hyperparameters={"inner_steps": True}).validate()
    with pytest.raises(ValueError, match=re.escape("optimizer 'muon': adjust_lr_fn='rms' is invalid")):
        RunSpec(optimizer="muon", hyperparameters={"adjust_lr_fn": "rms"}).validate()


def test_a_bool_is_never_a_count_outside_the_optimizers_either():
    from gnlib.checks import check_positive_int
    from gnlib.data import BatchSampler
    from gnlib.optim.schedules import make_schedule

    tokens = torch.arange(100)
    for call, parameter in [
        (lambda: check_positive_int("steps", True), "steps"),
        (lambda: make_schedule("cosine_decay", True), "total_steps"),
        (lambda: make_schedule("warmup_cosine", 10, warmup_steps=True), "warmup_steps"),
        (lambda: BatchSampler(tokens, True, 8, 0, shard=(0, 1)), "batch_size"),
        (lambda: BatchSampler(tokens, 2, True, 0, shard=(0, 1)), "seq_len"),
    ]:
        with pytest.raises(ValueError, match=parameter):
            call()
