"""Classic bias correction of every layer, measured: why `QuantSpec.bias_correction` stops at the output layer.

Nagel et al.'s bias correction subtracts each layer's expected rounding error, ΔW · E[a], from its bias. This bench
applies it as a shift of the layer's output (forward hooks on a nearest-rounding super-network of the built-in
model, so nothing in tmpq changes) in four variants, and prints ε̂'s mean offset and relative error against FP per
timestep of the calibration set, then FID at `--steps` uniform steps:

- `nearest`: no correction;
- `output`: the last convolution only (what the default's bias-corrected rounding removes, as a shift);
- `all`: every Conv2d/Linear, E[a] over the whole calibration set (the classic form);
- `all+act`: as `all`, with the activation quantizer's mean error too (W_q · E[Q(a)] − W · E[a]);
- `all-per-t`: as `all`, with E[a] per calibration timestep (the step's nearest), a timestep-aware correction.

    .venv/bin/python bench/bias_shift.py --num-samples 1000 --configs W8A8,W6A6,W4A8,W4A6 --out runs/bias_shift
    .venv/bin/python bench/bias_shift.py --by-group --configs W4A8,W6A6 --out runs/bias_shift   # which layers hurt
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn

from tmpq.evaluate import EvalConfig, evaluate, reference_metric
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec
from tmpq.quant.bias_correction import input_mean_shape_ok, sum_input
from tmpq.quant.prepare import prepare_supernet
from tmpq.sampling.conditioning import call_denoiser
from tmpq.search.config import precision_of

MODES = ("nearest", "output", "all", "all+act", "all-per-t")
GROUPS = {
    "time embedding": lambda n: "time_emb" in n,
    "attention projections": lambda n: "attentions" in n,
    "ResNet convolutions": lambda n: "resnets" in n and n.rsplit(".", 1)[-1] in ("conv1", "conv2"),
    "ResNet shortcuts": lambda n: "conv_shortcut" in n,
    "up/down samplers": lambda n: "samplers" in n,
    "all but time embedding": lambda n: "time_emb" not in n,
}
"""Layer groups of a diffusers UNet for `--by-group`: `all` applied to one group at a time."""


class Shifts:
    """Input means measured on the FP model, and the output-shift hooks of one mode on the switched super-network."""

    def __init__(self, sn, calib) -> None:
        self.sn, self.units = sn, [u for u in sn.units.values() if hasattr(u, "act") and input_mean_shape_ok(u.base)]
        self.steps = sorted(set(calib.t.tolist()))
        self.t: int | None = None  # the calibration timestep the current call reads its means at
        self.hooks: list = []
        sums: dict[tuple, list] = {}

        def measure(unit, args) -> None:
            for a in (None, *unit.a_candidates):
                if a is not None:
                    unit.act.bits = a
                x = args[0] if a is None else unit.act(args[0])
                unit.act.bits = None
                total, _, n = sum_input(unit.base, x)
                for key in ((unit.name, a, None), (unit.name, a, self.t)):
                    acc = sums.setdefault(key, [0.0, 0])
                    acc[0], acc[1] = acc[0] + total, acc[1] + n

        sn.set_fp()
        handles = [u.register_forward_pre_hook(measure) for u in self.units]
        with torch.no_grad():
            for tv in self.steps:
                self.t = tv
                idx = (calib.t == tv).nonzero().flatten()
                for i in range(0, len(idx), 64):
                    call_denoiser(sn.model, *calib.rows(idx[i : i + 64]))
        for h in handles:
            h.remove()
        self.mean = {k: s / n for k, (s, n) in sums.items()}

    def apply(self, mode: str) -> None:
        """Hook the shifts of `mode` for the super-network's current widths (after set_config)."""
        self.clear()
        for u in self.units:
            w, a = u.bits
            if mode == "nearest" or w is None or (mode == "output" and not u.name.endswith("conv_out")):
                continue
            weight = u.base.weight.detach().float().reshape(u.base.weight.shape[0], -1)
            wq = u.dequantized_weight(w).float().reshape(weight.shape)
            shape = (1, -1, 1, 1) if u.kind == "conv" else (-1,)
            table = {}
            for tv in self.steps if mode == "all-per-t" else (None,):
                m = self.mean[(u.name, None, tv)]
                err = wq @ self.mean[(u.name, a, tv)] - weight @ m if mode == "all+act" and a else (wq - weight) @ m
                table[tv] = (-err).reshape(shape)
            self.hooks.append(u.register_forward_hook(lambda mod, i, o, table=table: o + table[self._key(table)]))

    def _key(self, table: dict) -> int | None:
        return self.t if self.t in table else None

    def clear(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


class AtStep(nn.Module):
    """The denoiser, telling `Shifts` which calibration timestep is nearest to each call's t."""

    def __init__(self, inner: nn.Module, shifts: Shifts) -> None:
        super().__init__()
        self.inner, self.shifts = inner, shifts

    def forward(self, x, t, *args, **kwargs):
        tv = float(t.flatten()[0])
        self.shifts.t = min(self.shifts.steps, key=lambda s: abs(s - tv))
        return self.inner(x, t, *args, **kwargs)


def _probe(sn, calib, shifts: Shifts, label: str, mode: str) -> list[str]:
    """ε̂'s mean offset / relative error against FP per probed timestep, with `mode`'s shifts on `label`."""
    cells = []
    for tv in shifts.steps[::-4]:
        x, t, _ = calib.rows((calib.t == tv).nonzero().flatten()[:64])
        shifts.t = tv
        with torch.no_grad():
            shifts.clear()
            sn.set_fp()
            fp = sn(x, t)
            sn.set_config(sn.uniform_config(*precision_of(label)))
            shifts.apply(mode)
            d = sn(x, t) - fp
        shifts.clear()
        cells.append(f"{float(d.mean()):+.4f} / {float(d.norm() / fp.norm()):.3f}")
    return cells


def main(
    configs: str = "W8A8,W6A6,W4A8,W4A6",
    modes: Annotated[str, typer.Option(help=f"comma-separated, of {MODES}")] = ",".join(MODES),
    steps: int = 10,
    num_samples: int = 1000,
    out: Path = Path("runs/bias_shift"),
    by_group: Annotated[bool, typer.Option("--by-group", help="probe `all` one layer group at a time; no FID")] = False,
    threads: int = 1,
) -> None:
    torch.set_num_threads(threads)
    loaded = load_model("builtin:fashion")
    spec = QuantSpec(bias_correction=(), reconstruction=None)  # nearest rounding: the shifts are the only correction
    sn, calib, _ = prepare_supernet(loaded, out / "nearest", CalibConfig(num_samples=128, num_steps=20), spec)
    shifts = Shifts(sn, calib)
    wanted = modes.split(",")
    head = " | ".join(f"t = {t}" for t in shifts.steps[::-4])
    if by_group:
        every = shifts.units
        typer.echo(f"| config | `all` on | layers | {head} |\n|---|---|---:|" + "---:|" * len(shifts.steps[::-4]))
        for label in configs.split(","):
            for group, member in GROUPS.items():
                shifts.units = [u for u in every if member(u.name)]
                cells = _probe(sn, calib, shifts, label, "all")
                typer.echo(f"| {label} | {group} | {len(shifts.units)} | " + " | ".join(cells) + " |")
        typer.echo("\n(ε̂ mean offset / relative error against FP, 64 calibration inputs per timestep)")
        return
    typer.echo(f"| config | correction | {head} |\n|---|---|" + "---:|" * len(shifts.steps[::-4]))
    for label in configs.split(","):
        for mode in wanted:
            typer.echo(f"| {label} | {mode} | " + " | ".join(_probe(sn, calib, shifts, label, mode)) + " |")
    typer.echo("\n(ε̂ mean offset / relative error against FP, 64 calibration inputs per timestep)\n")
    metric = reference_metric("fashion-mnist")
    rows = []
    for label in ["FP", *configs.split(",")]:
        for mode in wanted if label != "FP" else ["nearest"]:
            shifts.clear()
            sn.set_fp() if label == "FP" else sn.set_config(sn.uniform_config(*precision_of(label)))
            shifts.apply(mode)
            cfg = EvalConfig(model="builtin:fashion", steps=steps, schedule="uniform", num_samples=num_samples)
            with torch.no_grad():
                r = evaluate(cfg, None, loaded=replace(loaded, denoiser=AtStep(sn, shifts)), metric=metric)
            rows.append({"config": label, "correction": mode, "fid": r.fid, "fid_halves": r.fid_halves})
            typer.echo(f"{label} {mode}: FID {r.fid:.2f}", err=True)
    shifts.clear()
    (out / "fid.json").write_text(json.dumps(rows, indent=1))
    typer.echo(f"| config | {' | '.join(wanted)} |\n|---|" + "---:|" * len(wanted))
    for label in ["FP", *configs.split(",")]:
        fids = {r["correction"]: r["fid"] for r in rows if r["config"] == label}
        typer.echo(f"| {label} | " + " | ".join(f"{fids[m]:.2f}" if m in fids else "—" for m in wanted) + " |")
    typer.echo(f"\nFID, {num_samples} samples (seeds 0–{num_samples - 1}), {steps} uniform DDIM steps.")


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()
    typer.run(main)
