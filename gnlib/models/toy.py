"""Toy models for teaching: an affine map and a small multilayer perceptron, seeded without touching the global RNG."""

from __future__ import annotations

import torch
from torch import nn

from gnlib.runtime import check_choice, invalid

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}


def linear_model(d_in: int, d_out: int, bias: bool = True, *, seed: int = 0) -> nn.Linear:
    """Affine map z = W x + b on inputs (N, d_in): linear or (with cross-entropy) logistic regression.

    PyTorch's default initialization, drawn from ``seed`` without touching the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(d_in, d_out, bias=bias)


def mlp(sizes: list[int], activation: str = "tanh", *, seed: int = 0) -> nn.Sequential:
    """Multilayer perceptron sizes[0] → sizes[1] → … → sizes[-1] with ``activation`` between linear layers.

    Linear layers sit at indices 0, 2, 4, … of the Sequential; no activation after the last one.

    Raises:
        ValueError: fewer than two sizes, or an unknown ``activation`` (allowed: tanh, relu, gelu, silu, sigmoid).
    """
    check_choice("activation", activation, _ACTIVATIONS)
    if len(sizes) < 2:
        raise invalid("", "sizes", sizes, "a list of at least an input and an output width")
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)
