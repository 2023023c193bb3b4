"""gnlib: exact Gauss-Newton optimization of transformer language models, as a research workbook.

The public API is what this module exports, each name taken from the package that owns its job, in layers
that import downward only: ``gnlib.models``, ``gnlib.curvature``, ``gnlib.optim``, ``gnlib.data``,
``gnlib.experiment``, then ``gnlib.notebook`` (what notebooks use beyond this API) and ``gnlib.tools``
(the command-line tools); docs/architecture.md has the map.
"""

from gnlib.curvature import (
    GGNOperator,
    HessianOperator,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
    ggn_vp,
    gn_inner_step,
    gradient,
    hvp,
    jvp,
    linearize,
    vjp,
)
from gnlib.curvature.blocks import (
    BlockDiagonalOperator,
    block_norms,
    by_patterns,
    coarse_halves,
    off_diagonal_share,
    per_layer,
    per_tensor,
)
from gnlib.curvature.operators import LinearOperator
from gnlib.curvature.spectra import hutchinson_trace, lanczos, spectral_density
from gnlib.data import Corpus, load_corpus
from gnlib.data.pipeline import after_warmup, build_run_data
from gnlib.data.stream import PackedStream
from gnlib.data.tokenizers import make_tokenizer
from gnlib.experiment.history import History
from gnlib.experiment.lr_choice import lr_sweep
from gnlib.experiment.runs import OPTIMIZERS, RunSpec, run, steps_to_target
from gnlib.experiment.train import TrainSettings, train
from gnlib.losses import MSE, CrossEntropy
from gnlib.models import PRESETS, ModelConfig, Transformer, build_model, model_config
from gnlib.optim import GaussNewton, make_gauss_newton, make_optimizer

__version__ = "0.1.0"

__all__ = [
    # models
    "PRESETS",
    "ModelConfig",
    "Transformer",
    "build_model",
    "model_config",
    # losses
    "CrossEntropy",
    "MSE",
    # curvature: products at θ, then operators, dense float64 oracles, blocks, spectra
    "jvp",
    "vjp",
    "ggn_vp",
    "hvp",
    "gradient",
    "gn_inner_step",
    "linearize",
    "LinearOperator",
    "GGNOperator",
    "HessianOperator",
    "dense_jacobian",
    "dense_ggn",
    "dense_hessian",
    "BlockDiagonalOperator",
    "block_norms",
    "by_patterns",
    "coarse_halves",
    "off_diagonal_share",
    "per_layer",
    "per_tensor",
    "hutchinson_trace",
    "lanczos",
    "spectral_density",
    # optimizers
    "GaussNewton",
    "make_gauss_newton",
    "make_optimizer",
    # data
    "Corpus",
    "PackedStream",
    "after_warmup",
    "build_run_data",
    "load_corpus",
    "make_tokenizer",
    # experiments
    "OPTIMIZERS",
    "RunSpec",
    "run",
    "steps_to_target",
    "TrainSettings",
    "train",
    "History",
    "lr_sweep",
]
