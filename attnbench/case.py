"""What every measured case offers the pipeline of :mod:`attnbench.measure`, whatever it
measures: the attention call alone (:class:`attnbench.measure.AttentionCase`) or a whole
model (:class:`attnbench.model.ModelCase`).

A case holds its inputs, drawn once on the device, and the call. Its :meth:`Case.runner`
is the timed call of the configuration's mode (:func:`runner_for`); its
:meth:`Case.verify` returns the row's verification fields or raises :class:`Wrong`.
This module sits below both kinds of case, so neither imports the other's module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from .config import BenchConfig
from .registry import Impl

__all__ = ["Case", "Wrong", "runner_for"]


class Wrong(Exception):
    """The implementation's answer failed verification; ``fields`` go into the row."""

    def __init__(self, msg: str, fields: dict):
        super().__init__(msg)
        self.fields = fields


class Case(Protocol):
    """One measurement's inputs and call, as the pipeline uses them."""

    config: BenchConfig
    impl: Impl

    @property
    def device(self) -> torch.device: ...

    def forward(self) -> torch.Tensor:
        """One forward call on the case's inputs."""
        ...

    def contract(self, out: torch.Tensor) -> None:
        """Raise if the first call's output breaks the implementation's contract."""
        ...

    def verify(self, out: torch.Tensor) -> dict:
        """The row's verification fields for ``out``; raises :class:`Wrong`."""
        ...

    def runner(self) -> tuple[Callable[[], object], list[torch.Tensor]]:
        """(the timed call, the tensors whose ``.grad`` is cleared before each call)."""
        ...


def runner_for(
    mode: str, forward: Callable[[], torch.Tensor], cotangent: torch.Tensor | None, leaves: list[torch.Tensor]
) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """(the timed call, the tensors whose ``.grad`` is cleared before each call) of
    ``forward`` in ``mode``: fwd without autograd; fwd_bwd the forward and the backward
    of ``cotangent``; bwd the backward alone, its forward graph built here, untimed."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return forward()

        return fwd, []
    if mode == "fwd_bwd":
        return (lambda: forward().backward(cotangent)), leaves
    out = forward()
    return (lambda: out.backward(cotangent, retain_graph=True)), leaves
