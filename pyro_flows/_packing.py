r"""One flat parameter tensor behind all the layers of a flow.

Pyro's optimizers run one torch optimizer per parameter tensor and every tensor is a
``pyro.param`` statement at each step; a flow of a few layers has about twenty. Packing
them into one tensor, of which each layer sees a view, makes those costs one.

A parameter can also be given a constant multiplier: the layer then sees ``c * view``, and an
optimizer whose step size does not depend on the gradient's magnitude (Adam) moves it ``c``
times slower.
"""

from __future__ import annotations

__all__ = ["ParameterPacking"]

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Size, Tensor


@dataclass(frozen=True)
class _Slot:
    module: nn.Module
    name: str
    start: int
    shape: Size
    multiplier: float = 1.0

    @property
    def stop(self) -> int:
        return self.start + self.shape.numel()


class ParameterPacking:
    r"""Moves the parameters of a module into one flat tensor and binds views of it.

    After packing, the module holds no parameters of its own: :meth:`bind` sets each former
    parameter to a view of a given flat tensor (the live parameter, or a detached copy of
    it), and the module computes with those views until the next :meth:`bind`.

    Arguments:
        slots: Where each parameter lives: its module, attribute name, offset and shape.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
        >>> packing, values = ParameterPacking.pack(net)
        >>> flat = nn.Parameter(values)
        >>> flat.shape, len(list(net.parameters()))
        (torch.Size([13]), 0)
        >>> packing.bind(flat)
        >>> net(torch.ones(2)).shape
        torch.Size([1])
    """

    def __init__(self, slots: tuple[_Slot, ...]) -> None:
        self.slots = slots
        self.sizes = [slot.shape.numel() for slot in slots]
        self.numel = sum(self.sizes)

    @classmethod
    def pack(
        cls, module: nn.Module, multipliers: dict[Tensor, float] | None = None
    ) -> tuple[ParameterPacking, Tensor]:
        r"""Moves the parameters of ``module`` out of it.

        Arguments:
            module: The module whose parameters are moved (modified in place).
            multipliers: A constant multiplier for some of the parameters (by identity).

        Returns:
            The packing and the flat tensor of the parameters' current values (divided by
            their multipliers), to which the module is bound.
        """

        multipliers = {id(p): c for p, c in (multipliers or {}).items()}
        slots, values, start = [], [], 0
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is None:
                    continue
                multiplier = multipliers.get(id(param), 1.0)
                slots.append(_Slot(owner, name, start, param.shape, multiplier))
                values.append(param.detach().reshape(-1) / multiplier)
                start += param.numel()
                del owner._parameters[name]
        packing = cls(tuple(slots))
        flat = torch.cat(values) if values else torch.zeros(0)
        packing.bind(flat)
        return packing, flat

    def bind(self, flat: Tensor) -> None:
        r"""Makes every packed parameter a view of ``flat``.

        Arguments:
            flat: A tensor of shape ``(numel,)``.
        """

        if flat.shape != (self.numel,):
            raise ValueError(f"Expected {self.numel} packed parameters, got shape {flat.shape}.")
        chunks = flat.split(self.sizes)
        for slot, chunk in zip(self.slots, chunks, strict=True):
            view = chunk.view(slot.shape)
            slot.module.__dict__[slot.name] = (
                view if slot.multiplier == 1 else slot.multiplier * view
            )

    def unbind(self) -> None:
        r"""Drops the views (before pickling or copying; :meth:`bind` restores them)."""

        for slot in self.slots:
            slot.module.__dict__[slot.name] = None
