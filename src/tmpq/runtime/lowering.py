"""Lower a `CompressedSampler` (a super-network switched per step) to a deployable `RuntimeSampler`.

The super-network keeps every candidate width and fake-quantizes everything: right for searching, slow and
large for serving. Lowering keeps only the widths the sampler uses and picks, layer by layer, how each runs
(`Backend.mode`):

- `int8`: every Conv2d/Linear whose weight and input are both quantized (any widths ≤ 8) runs on a real integer
  kernel (oneDNN on x86 CPUs, `torch._int_mm` elsewhere); sub-8-bit layers use the same int8 kernel, so they gain
  memory and BitOPs but no speed beyond 8-bit. Layers with a full-precision input or weight run in float.
- `fake`: the search's own fake-quantized arithmetic with float weights, only the used widths kept.
- `packed`: like `fake`, but weights stay bit-packed in memory and are dequantized at each call.
- `auto`: the fast kernel the device has for the super-network's 8-bit format: `fp8` for an e4m3 super-network where
  `torch._scaled_mm` runs, `int8` for an integer one where an integer kernel runs, `fake` otherwise.
- `fp8`: for super-networks whose 8-bit candidates are float8 e4m3 (`QuantSpec.format8="fp8_e4m3"`), every
  Conv2d/Linear at fp8 weights and activations runs on `torch._scaled_mm` (fast on Hopper/Ada GPUs, emulated on
  CPUs); other widths run as `fake`.

`dtype` sets the float arithmetic around the quantized layers (norms, attention, float layers): bf16 or fp16
where the device is fast at it. What cannot run as asked (no integer kernel on this device, an unsupported
layer) falls back to float with a warning, and `RuntimeSampler.plan` names how every layer runs.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from tmpq.compressed import CompressedSampler, sample_images
from tmpq.errors import TmpqError
from tmpq.quant.layers import MatmulQuant, QuantWeightLayer
from tmpq.runtime.kernels import KERNELS, fp8_available, kernel_available
from tmpq.runtime.layers import ActRange, RuntimeLayer, _Weight
from tmpq.sampling.conditioning import Conditioning, call_denoiser

MODES = ("int8", "fake", "packed", "fp8", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RuntimeFallbackWarning(UserWarning):
    """A layer could not run the way the backend asked and runs in float instead."""


@dataclass(frozen=True)
class Backend:
    """How a compressed sampler executes: `mode` (int8 | fp8 | fake | packed | auto), the float `dtype` around it, the
    `device`, and which integer `kernel` (auto: oneDNN on CPU, torch._int_mm elsewhere). `exact_rounding` quantizes
    activations with the search's own rounding instead of PyTorch's faster fused quantizer (see
    `kernels.quantize_act`): the integer layers then equal the fake-quantized ones to float rounding."""

    mode: str = "int8"
    dtype: str = "float32"
    device: str = "cpu"
    kernel: str = "auto"
    channels_last: bool | None = None  # None: on where oneDNN int8 kernels run (they want it), off otherwise
    exact_rounding: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TmpqError(f"backend mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise TmpqError(f"backend dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.kernel not in ("auto", *KERNELS):
            raise TmpqError(f"backend kernel must be 'auto' or one of {KERNELS}, got {self.kernel!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise TmpqError(f"device {self.device!r} asked for, but this PyTorch sees no CUDA device; use 'cpu'")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def int_kernel(self) -> str | None:
        """The integer kernel to use on this device, or None when none runs here."""
        dev = torch.device(self.device).type
        order = [self.kernel] if self.kernel != "auto" else (["onednn", "int_mm"] if dev == "cpu" else ["int_mm"])
        return next((k for k in order if kernel_available(k, dev)), None)


class RuntimeDenoiser(nn.Module):
    """The lowered model; before each call it selects every layer's variant for the step's phase."""

    def __init__(self, model: nn.Module, layers: dict[str, RuntimeLayer], matmuls: dict[str, MatmulQuant],
                 step_bits: dict[int, dict[str, tuple]], dtype: torch.dtype, channels_last: bool) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.layers, self.matmuls = layers, matmuls
        self.step_bits = step_bits
        self.dtype, self.channels_last = dtype, channels_last
        self._phase: int | None = None

    def select(self, t: int) -> None:
        bits = self.step_bits.get(t)
        if bits is None:
            raise TmpqError(f"timestep {t} is not one of this sampler's steps {sorted(self.step_bits)}")
        if self._phase == id(bits):
            return
        for name, layer in self.layers.items():
            layer.active = bits[name]
        for name, m in self.matmuls.items():
            m.set_bits(None, bits[name][1])
        self._phase = id(bits)

    @torch.no_grad()  # inference only: the frozen layers quantize in place and hold no gradients
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        self.select(int(t[0]))
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if cond is not None and cond.table.dtype != self.dtype:
            cond = Conditioning(cond.table.to(self.dtype), cond.ids)
        return call_denoiser(self.model, x, t, cond).float()


class RuntimeSampler:
    """A deployable sampler: fixed timesteps, frozen quantized layers, one backend. `sample()` makes images."""

    def __init__(self, denoiser: RuntimeDenoiser, source: CompressedSampler, backend: Backend,
                 plan: list[dict]) -> None:  # fmt: skip
        self.denoiser = denoiser
        self.schedule, self.timesteps = source.schedule, source.timesteps
        self.sample_shape, self.eta = source.sample_shape, source.eta
        self.parts = source.parts  # FP decoder / text encoder, prompts (no reference to the super-network is kept)
        self.backend = backend
        self.plan = plan
        self.info = dict(source.info)
        self._bitops = source.bitops()
        self._bitops_fp = source.supernet.cost.bitops(None, len(source.timesteps))

    conditioning = CompressedSampler.conditioning  # reads only self.parts

    def bitops(self) -> int:
        return self._bitops

    ddim = CompressedSampler.ddim  # reads only schedule, timesteps and eta

    @torch.no_grad()
    def sample(
        self,
        num_samples: int = 64,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        prompts: str | Sequence[str] | None = None,
        decode: bool = True,
        classes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Images on the CPU exactly as `CompressedSampler.sample` makes them (same seeds, prompts, decoding)."""
        return sample_images(
            self, self.denoiser, num_samples, seed, batch_size, progress, prompts, decode, self.backend.device, classes
        )

    def memory_bytes(self) -> int:
        """Bytes the model keeps resident: frozen layers' weights/kernels plus every other parameter and buffer."""
        own = {id(p) for layer in self.denoiser.layers.values() for p in layer.parameters()}
        rest = [t for t in [*self.denoiser.parameters(), *self.denoiser.buffers()] if id(t) not in own]
        return sum(layer.nbytes() for layer in self.denoiser.layers.values()) + sum(
            t.numel() * t.element_size() for t in rest
        )

    def summary(self) -> dict:
        """How the work is executed: share of MACs per execution kind, resident bytes, the backend."""
        macs: Counter[str] = Counter()
        for row in self.plan:
            macs[row["runs"]] += row["macs"]
        total = sum(macs.values()) or 1
        return {
            "backend": asdict(self.backend),
            "steps": len(self.timesteps),
            "mac_share": {k: round(v / total, 4) for k, v in macs.most_common()},
            "memory_bytes": self.memory_bytes(),
            "bitops_per_image": self._bitops,
            "bitops_fraction_of_fp_same_steps": self._bitops / self._bitops_fp,
        }


def _act_range(q, bits: int | None) -> ActRange | None:
    if bits is None:
        return None
    scale, zp = getattr(q, f"a{bits}_scale"), getattr(q, f"a{bits}_zp")
    return ActRange(bits, tuple(float(s) for s in scale), tuple(int(z) for z in zp), q.is_fp8(bits))


def _auto_mode(fp8: bool, backend: Backend) -> str:
    """What `auto` runs: the device's kernel for the super-network's 8-bit format, else the lean fake path."""
    if fp8:
        return "fp8" if fp8_available(torch.device(backend.device).type) else "fake"
    return "int8" if backend.int_kernel() is not None else "fake"


def _lower_layer(twin: QuantWeightLayer, pairs: Sequence[tuple], backend: Backend, kernel: str | None,
                 device: torch.device) -> tuple[RuntimeLayer, dict]:  # fmt: skip
    base = twin.base
    if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":
        raise TmpqError(
            f"layer {twin.name!r} pads with {base.padding_mode!r}; the runtime supports zero padding only. "
            "Use the super-network sampler (backend mode 'fake' through CompressedSampler.sample) for this model"
        )
    layer = RuntimeLayer(twin.name, base, twin.act.split).to(device)
    dtype = backend.torch_dtype
    reasons = {}
    for w, a in pairs:
        act = _act_range(twin.act, a)
        if w is None:
            layer.add_dequant_variant((w, a), base.weight.detach().to(device, dtype), act, dtype)
            continue
        codes, scale, zp = (t.to(device) for t in twin.weight_codes(w))
        fmt = twin.weight_format(w)
        groups = getattr(base, "groups", 1)
        if backend.mode == "fp8" and act is not None:
            if fmt == "fp8_e4m3" and act.fp8 and groups == 1 and fp8_available(device.type):
                layer.add_fp8_variant((w, a), codes, scale, act, dtype)
                continue
            reasons[(w, a)] = (
                f"no fp8 matmul on {device.type} in this PyTorch build"
                if fmt == "fp8_e4m3" and act.fp8 and groups == 1
                else f"grouped convolution (groups={groups})"
                if groups != 1
                else "not float8 at both weight and activation (an integer width, or int8 super-network)"
            )
        if backend.mode == "int8" and act is not None and (fmt != "int" or act.fp8):
            reasons[(w, a)] = "float8 layer (run this sampler with the fp8 backend)"
        elif backend.mode == "int8" and act is not None:
            if kernel is not None and groups == 1:
                layer.add_int_variant((w, a), codes, scale, zp, act, kernel, dtype, backend.exact_rounding)
                continue
            reasons[(w, a)] = (
                f"no integer kernel for {torch.device(backend.device).type} that sums exactly in this PyTorch build "
                "and CPU"
                if kernel is None
                else f"grouped convolution (groups={groups})"
            )
        resident = "packed" if backend.mode == "packed" else "float"
        weight = _Weight(codes, scale, zp, w, base.weight.shape, resident, dtype, fmt)
        layer.add_dequant_variant((w, a), weight, act, dtype)
    return layer, reasons


def lower(sampler: CompressedSampler, backend: Backend | str = "int8", inplace: bool = False) -> RuntimeSampler:
    """A `RuntimeSampler` running `sampler`'s timesteps and bits on `backend` (see the module doc).

    The super-network is left untouched unless `inplace`, which saves a copy of the float parts of the model and
    leaves `sampler` unusable (what `tmpq.load(dir).lower(backend, inplace=True)` does with a freshly read one).
    """
    backend = Backend(mode=backend) if isinstance(backend, str) else backend
    sn = sampler.supernet
    device = torch.device(backend.device)
    if backend.mode == "auto":
        backend = replace(backend, mode=_auto_mode(sn.spec.fp8, backend))
    kernel = backend.int_kernel() if backend.mode == "int8" else None
    cl = backend.channels_last if backend.channels_last is not None else kernel == "onednn"
    steps = sampler.step_configs()
    used: dict[str, list[tuple]] = {n: [] for n in sn.units}
    for _, cfg in steps:
        for name, w, a in cfg.bits:
            if (w, a) not in used[name]:
                used[name].append((w, a))

    layers, memo, plan, fallbacks = {}, {}, [], {}
    sn.set_fp()
    for name, unit in sn.units.items():
        macs = sn.cost.units[name].macs if sn.cost else 0
        if isinstance(unit, MatmulQuant):
            for w, a in used[name]:
                plan.append(
                    {"layer": name, "w": w, "a": a, "macs": macs, "runs": "float matmul, fake-quantized operands"}
                )
            continue
        layer, reasons = _lower_layer(unit, used[name], backend, kernel, device)
        if cl:
            layer.to_channels_last()
        layers[name] = layer
        memo[id(unit)] = layer
        for (w, a), v in layer.variants.items():
            plan.append({"layer": name, "w": w, "a": a, "macs": macs, "runs": v.how})
        fallbacks.update({(name, *k): r for k, r in reasons.items()})
    if fallbacks:
        why = Counter(fallbacks.values())
        warnings.warn(
            f"{len(fallbacks)} quantized layer variant(s) run in float instead of on a {backend.mode} kernel: "
            + "; ".join(f"{n}× {r}" for r, n in why.items())
            + f". Their output is the same fake-quantized arithmetic, without the {backend.mode} speed-up.",
            RuntimeFallbackWarning,
            stacklevel=2,
        )
    if inplace:
        for name, layer in layers.items():
            sn.replace_module(name, layer)
        model = sn.model
    else:
        model = copy.deepcopy(sn.model, memo)  # the twins map to their frozen layers: candidate codes are not copied
    model = model.to(device=device, dtype=backend.torch_dtype)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    matmuls = {n: model.get_submodule(n) for n, u in sn.units.items() if isinstance(u, MatmulQuant)}
    phase_bits = {id(cfg): cfg.as_dict() for cfg in sampler.phase_configs}
    step_bits = {t: phase_bits[id(cfg)] for t, cfg in steps}  # one dict per phase: the denoiser switches per phase
    den = RuntimeDenoiser(model.eval(), layers, matmuls, step_bits, backend.torch_dtype, cl)
    return RuntimeSampler(den, sampler, backend, plan)


def load(directory, backend: Backend | str | None = None) -> CompressedSampler | RuntimeSampler:
    """Deprecated: `tmpq.load(directory)`, then `.lower(backend, inplace=True)`; kept for one release."""
    import warnings

    from tmpq.export import load as load_export

    warnings.warn(
        "tmpq.runtime.load is deprecated; use tmpq.load(dir) and .lower(backend, inplace=True)",
        DeprecationWarning,
        stacklevel=2,
    )
    sampler = load_export(directory)
    return sampler if backend is None else sampler.lower(backend, inplace=True)
