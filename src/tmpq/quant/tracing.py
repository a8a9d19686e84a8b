"""Tracing a wrapped model once: what each unit costs (MACs → the BitOPs cost model) and where skip concatenations
split a layer's input into two differently ranged parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from tmpq.quant.cost import CostModel, UnitCost
from tmpq.quant.layers import MatmulQuant
from tmpq.sampling.conditioning import call_denoiser

if TYPE_CHECKING:
    from tmpq.quant.supernet import SuperNet


@torch.no_grad()
def trace_units(sn: SuperNet, example: tuple) -> None:
    """One FP forward of one image of `example` with counting twins: MACs per unit and image (the cost model; a
    guided model's doubled batch and a unit called twice both count), the skip-concat split points of up-block
    inputs, and units never executed (unwrapped: they would get no calibration data)."""
    x, t, *rest = example
    cond = rest[0].select(0, 1) if rest and rest[0] is not None else None
    hidden: dict[str, int] = {}
    hooks = []
    for name, m in sn.model.named_modules():
        if "UpBlock" in type(m).__name__ and isinstance(getattr(m, "resnets", None), nn.ModuleList):

            def pre(mod, args, kwargs, name=name):
                hs = kwargs.get("hidden_states", args[0] if args else None)
                hidden[name] = int(hs.shape[1])

            hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    for u in sn.units.values():
        u.counting, u.macs = True, 0  # MACs of one image's call, summed over every call of the unit
    try:
        sn.set_fp()
        call_denoiser(sn.model, x[:1], t[:1], cond)
    finally:
        for u in sn.units.values():
            u.counting = False
        for h in hooks:
            h.remove()
    if sn.spec.split_concat:
        for block_name, ch in hidden.items():
            block = sn.model.get_submodule(block_name)
            for j, resnet in enumerate(block.resnets):
                split = ch if j == 0 else int(block.resnets[j - 1].out_channels)
                for child in ("conv1", "conv_shortcut"):
                    unit = getattr(resnet, child, None)
                    if unit in sn.units.values() and 0 < split < unit.base.in_channels:
                        unit.act.split = split
    unused = [n for n, u in sn.units.items() if u.macs == 0]
    for n in unused:  # never executed: quantizing it changes nothing and it would get no calibration data
        u = sn.units.pop(n)
        sn.pinned.pop(n, None)
        if not isinstance(u, MatmulQuant):
            sn.replace_module(n, u.base)
    n_unit = sum(getattr(u, "weight_params", 0) + getattr(u, "bias_params", 0) for u in sn.units.values())
    n_all = sum(p.numel() for p in sn.model.parameters())
    sn.cost = CostModel(
        {n: UnitCost(u.kind, int(u.macs), int(u.weight_params), int(u.bias_params)) for n, u in sn.units.items()},
        other_params=n_all - n_unit,
    )
