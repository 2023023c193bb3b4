"""Data-parallel training on ``torch.distributed``: process group, disjoint batch shards, mean reductions.

Under ``torchrun --nproc_per_node K`` every process (rank r of K) holds the same model and optimizer
state and draws its own slice of each global batch (:class:`gnlib.data.BatchSampler` draws the K·b
windows one process at batch K·b would draw and keeps windows [r·b, (r+1)·b)). Every quantity that is a
mean over the batch (a gradient, a loss, a curvature product G·v) is the mean of the K per-rank means,
since all shards hold the same number of tokens; :func:`all_reduce_mean` takes that mean, so K processes
at batch b step exactly like one process at batch K·b, up to the order of floating-point sums.

Without a process group (a plain ``python`` run, or ``torchrun`` with K = 1 before
:func:`init_from_env`) every function here is the identity / rank 0 of 1, so single-process code pays
nothing. Backends: Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gnlib.runtime import die_with_parent, resolve_device

#: Environment variables torchrun sets for every process.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def in_process_group() -> bool:
    """True when this process joined a process group (it was started by torchrun), even one of one process."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """True on the process that writes outputs and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for on one process)."""
    if is_distributed():
        dist.barrier()


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 600.0) -> torch.device:
    """Join the process group described by torchrun's environment variables, if there is one.

    Args:
        device: ``"cpu"`` (Gloo backend) or ``"cuda"`` (NCCL; each process takes GPU ``LOCAL_RANK``).
        timeout_s: how long a collective may wait for the other processes.

    A process that joins dies with its launcher (:func:`gnlib.runtime.die_with_parent`): a ``kill -9`` of
    torchrun itself would otherwise leave its ranks training as orphans.

    Returns:
        The device this process computes on (``cuda:LOCAL_RANK`` under NCCL).

    Raises:
        ValueError: only some of torchrun's variables are set, or ``WORLD_SIZE`` exceeds the GPUs.
    """
    device = resolve_device(device)
    present = [name for name in TORCHRUN_ENV if name in os.environ]
    if not present or dist.is_initialized():
        return device
    if len(present) != len(TORCHRUN_ENV):
        missing = sorted(set(TORCHRUN_ENV) - set(present))
        raise ValueError(
            f"environment has {present} but not {missing}; start with torchrun (it sets all of {list(TORCHRUN_ENV)})"
        )
    die_with_parent()
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "allowed --nproc_per_node: at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _leaves(value: Any) -> list[Tensor | float]:
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, Tensor):
        return [value]
    return [float(value)]


def _rebuild(value: Any, reduced: Iterable[Tensor | float]) -> Any:
    if isinstance(value, Mapping):
        return {k: _rebuild(v, reduced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, reduced) for v in value)
    return next(reduced)


def _buffer_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value: Any) -> Any:
    """Mean over processes of ``value``: a tensor, a number, or lists/tuples/dicts of them (nested).

    One ``all_reduce`` of a single flat buffer per call (float64 when ``value`` holds Python numbers or
    float64 tensors, else the tensors' promoted dtype); the result has ``value``'s structure, tensors
    keep their dtype, shape and device and numbers come back as floats. Identity without a process group.
    """
    if not is_distributed():
        return value
    leaves = _leaves(value)
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    dtype = torch.float64 if len(tensors) < len(leaves) else tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device if tensors else _buffer_device()
    flat = torch.cat([torch.as_tensor(leaf, dtype=dtype, device=device).detach().reshape(-1) for leaf in leaves])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    reduced, start = [], 0
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            reduced.append(flat[start : start + leaf.numel()].view(leaf.shape).to(leaf.dtype))
            start += leaf.numel()
        else:
            reduced.append(float(flat[start]))
            start += 1
    return _rebuild(value, iter(reduced))


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Replace every ``.grad`` by its mean over processes (DDP's reduction; a missing grad counts as 0).

    Called after back-propagation and before clipping or ``optimizer.step()``. No-op without a process group.
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    for p, g in zip(params, all_reduce_mean(grads)):
        p.grad = g


def all_reduce_max(value: int) -> int:
    """The largest of the integers the processes pass (``value`` itself without a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_buffer_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0])


def check_same(what: str, value: int | float) -> None:
    """Raise ``ValueError`` unless every process passes the same ``value`` (e.g. the step a run resumes at).

    Catches processes that disagree before they wait forever on different collectives.
    """
    if not is_distributed():
        return
    t = torch.tensor([float(value), -float(value)], dtype=torch.float64, device=_buffer_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if float(t[0]) != -float(t[1]):
        raise ValueError(
            f"processes disagree on {what}: rank {rank()} has {value!r}, others range over "
            f"[{-float(t[1])}, {float(t[0])}]; every process must see the same run directory"
        )
