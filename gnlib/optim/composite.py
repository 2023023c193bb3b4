"""Several torch optimizers over disjoint tensors, driven as one optimizer."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle


class CompositeOptimizer:
    """One optimizer object made of named torch optimizers over disjoint sets of tensors.

    It offers what a training loop uses from a ``torch.optim.Optimizer``: ``param_groups`` (the inner
    optimizers' own group dicts, concatenated in the order of ``optimizers``, each tagged with
    ``group["optimizer"] = <name>``, so that setting ``group["lr"]`` reaches the inner optimizer),
    ``state``, ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict`` and
    ``register_step_pre_hook`` (e.g. gradient clipping before every inner optimizer steps). The tensors may be
    module parameters or plain leaf tensors whose ``.grad`` the caller fills.

    Args:
        optimizers: name -> torch optimizer, e.g. ``{"muon": Muon(...), "adamw": AdamW(...)}``.

    Raises:
        ValueError: no optimizers, or one tensor handled by two of them.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        """Check that the optimizers' tensors are disjoint and tag their groups."""
        if not optimizers:
            raise ValueError("optimizers must name at least one torch optimizer")
        seen: set[int] = set()
        for name, opt in optimizers.items():
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError(f"a tensor of optimizer {name!r} is already handled by another optimizer")
                    seen.add(id(p))
                group["optimizer"] = name
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        self._step_pre_hooks: OrderedDict[int, Callable[..., None]] = OrderedDict()

    def register_step_pre_hook(self, hook: Callable[..., None]) -> RemovableHandle:
        """Call ``hook(self, args, kwargs)`` at the start of every :meth:`step`, as ``torch.optim.Optimizer`` does."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """All inner param groups (the live dicts), in order of ``optimizers``."""
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """Per-tensor state of every inner optimizer, merged into one (read-only) dict."""
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Evaluate ``closure`` once (if given), then step every inner optimizer; return its loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for hook in list(self._step_pre_hooks.values()):
            hook(self, (), {})
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every tensor."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """``{name: inner.state_dict()}`` for every inner optimizer."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Mapping[str, Any]]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: the names of the saved optimizers differ from this one's.
        """
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"state_dict holds optimizers {sorted(state_dict)}, expected {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        """Names and classes of the inner optimizers."""
        inner = ", ".join(f"{name}={type(opt).__name__}" for name, opt in self.optimizers.items())
        return f"CompositeOptimizer({inner})"
