"""Export a compressed sampler to a directory, and load it back bit-exactly, without unpickling anything.

The directory holds:

- `tmpq_compressed.json` — the manifest: format version, the UNet config, the noise schedule, the kept
  timesteps, the bit allocation of every phase, concat split points, MACs per layer (for BitOPs), what
  produced it (source model checksum, search summary, versions) and the sha256 of the tensor file;
- `weights.safetensors` — quantized weights as integer codes, bit-packed (a 4-bit layer takes half the bytes of an
  8-bit one), with per-channel scale and zero point,
  only at the widths the allocation uses; activation scales and zero points at the widths used; every other
  parameter (biases, norms, embeddings, layers left in full precision) as float;
- `README.md` — a model card;
- for a latent or text-to-image model, its full-precision parts, each written by its own library's
  `save_pretrained` (safetensors + config) into `vae/` (or `vqvae/`), `text_encoder/` and `tokenizer/`, every file's
  sha256 in the manifest. Copies rather than a reference to the source pipeline directory: an export is meant to
  be shipped and loaded elsewhere, where the source directory (or hub cache) is not; these parts are small next to
  a UNet, and keeping them in their libraries' own format means no tmpq code is needed to read them.

`load(directory)` checks the tensor file's checksum before reading it, so a truncated or edited file is
rejected with a clear error, and reads tensors with safetensors only.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tmpq.compressed import CompressedSampler
from tmpq.errors import TmpqError
from tmpq.fileio import write_json_atomic
from tmpq.models.parts import LatentDecoder, PipelineParts, prompt_encoder, quiet_load_kwargs
from tmpq.provenance import file_sha256, provenance
from tmpq.quant.config import QuantConfig, QuantSpec
from tmpq.quant.cost import CostModel
from tmpq.quant.layers import MatmulQuant, dequantize_weight
from tmpq.quant.primitives import pack_codes, unpack_codes, width_format
from tmpq.quant.supernet import SuperNet, model_fingerprint
from tmpq.sampling.schedules import NoiseSchedule, schedule_from_dict

FORMAT = "tmpq-compressed"
FORMAT_VERSION = 3  # 2: weight codes bit-packed; 3: model kind, UNet class, FP pipeline parts (v2 still loads)
READABLE_VERSIONS = (2, 3)
PART_LIBRARIES = ("diffusers", "transformers")  # where the FP parts of a pipeline (VAE, text encoder) come from
MANIFEST = "tmpq_compressed.json"
TENSORS = "weights.safetensors"
CARD = "README.md"

_QPARAM = re.compile(r"(?:^|\.)(?:w|a)(\d+)_(?:codes|scale|zp)$")


def _part_modules(sampler: CompressedSampler) -> dict[str, object]:
    """The FP parts an export writes, by subdirectory name."""
    parts = sampler.parts
    modules = {}
    if parts.decoder is not None:
        modules[parts.decoder.key] = parts.decoder.vae
    if parts.text_encoder is not None:
        modules |= parts.text_encoder.components()
    return modules


def _check_target(directory: Path, overwrite: bool, part_dirs: list[str]) -> None:
    """An export writes only into a new or empty directory, or over an earlier export when asked: never over
    files tmpq did not write (a user's README.md or weights), and never into a subdirectory it does not own."""
    if directory.exists() and not directory.is_dir():
        raise TmpqError(f"--out {directory} is a file; give a directory path for the export")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    try:
        old = json.loads((directory / MANIFEST).read_text())
        owned = {MANIFEST, CARD, *old["files"]}
        old_parts = {p["dir"] for p in old.get("parts", {}).values()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        first = sorted(e.name for e in directory.iterdir())[0]
        raise TmpqError(
            f"{directory} already holds files tmpq did not write (e.g. {first}); they are left untouched: "
            "give a new or empty directory as --out"
        ) from None
    if not overwrite:
        raise TmpqError(f"{directory} already holds an export; pass overwrite=True (CLI: --overwrite) or another --out")
    foreign = [d for d in part_dirs if (directory / d).exists() and d not in old_parts]
    foreign += [n for n in (TENSORS, CARD) if (directory / n).exists() and n not in owned]
    if foreign:
        raise TmpqError(
            f"{directory} holds {foreign[0]!r}, which the earlier export there did not write; it is left untouched: "
            "give a new or empty directory as --out"
        )


def _save_parts(sampler: CompressedSampler, directory: Path) -> dict:
    """save_pretrained the FP parts into subdirectories; returns {name: {library, class, dir}} for the manifest."""
    saved = {}
    for name, obj in _part_modules(sampler).items():
        obj.save_pretrained(str(directory / name))
        saved[name] = {"library": type(obj).__module__.split(".")[0], "class": type(obj).__name__, "dir": name}
    return saved


def _part_files(directory: Path, parts: dict) -> dict[str, str]:
    return {
        str(f.relative_to(directory)): file_sha256(f)
        for p in parts.values()
        for f in sorted((directory / p["dir"]).rglob("*"))
        if f.is_file()
    }


def _unet_config(supernet: SuperNet) -> dict:
    unet = getattr(supernet.model, "unet", None)
    if unet is None or not hasattr(unet, "config"):
        raise TmpqError(
            f"export supports diffusers UNet denoisers; this super-network wraps {type(supernet.model).__name__}"
        )
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def _used_widths(configs) -> tuple[dict[str, set[int]], dict[str, set[int]], set[str]]:
    """Per unit: weight widths and activation widths used by any phase, and units with a full-precision weight."""
    w_used: dict[str, set[int]] = {}
    a_used: dict[str, set[int]] = {}
    fp_weight: set[str] = set()
    for cfg in configs:
        for name, w, a in cfg.bits:
            w_used.setdefault(name, set())
            a_used.setdefault(name, set())
            if w is None:
                fp_weight.add(name)
            else:
                w_used[name].add(w)
            if a is not None:
                a_used[name].add(a)
    return w_used, a_used, fp_weight


def export_sampler(
    sampler: CompressedSampler, directory: str | Path, info: dict | None = None, overwrite: bool = False
) -> Path:
    """Write `sampler` to `directory` (see the module doc). Refuses to overwrite another export unless asked."""
    directory = Path(directory)
    _check_target(directory, overwrite, list(_part_modules(sampler)))
    sn = sampler.supernet
    unet_config = _unet_config(sn)
    w_used, a_used, fp_weight = _used_widths(sampler.phase_configs)

    tensors: dict[str, torch.Tensor] = {}
    prefixes = {f"{n}.base.": f"{n}." for n, u in sn.units.items() if not isinstance(u, MatmulQuant)}
    for key, value in sn.model.state_dict().items():
        plain = key
        for wrapped, orig in prefixes.items():
            if key.startswith(wrapped):
                plain = orig + key[len(wrapped) :]
                break
        unit = plain.rsplit(".", 1)[0]
        if plain.endswith(".weight") and unit in sn.units and unit not in fp_weight:
            continue  # shipped as integer codes below
        tensors[f"fp.{plain}"] = value.detach().contiguous().cpu()
    packed: dict[str, dict] = {}
    for name, u in sn.units.items():
        for key, value in u.qparams().items():
            m = _QPARAM.search(key)
            bits = int(m.group(1)) if m else None
            used = w_used[name] if key.startswith("w") else a_used[name]
            if bits not in used:
                continue
            if key.endswith("_codes"):
                packed[f"{name}.{key}"] = {"bits": bits, "shape": list(value.shape)}
                value = pack_codes(value, bits)
            tensors[f"q.{name}.{key}"] = value.detach().contiguous().cpu()

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    tmp.chmod(0o644)  # safetensors creates 0600; an export is meant to be shipped and read by others
    tmp.replace(directory / TENSORS)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "unet_config": unet_config,
        "noise_schedule": sampler.schedule.to_dict(),
        "sample_shape": list(sampler.sample_shape),
        "timesteps": list(sampler.timesteps),
        "eta": sampler.eta,
        "phase_bounds": list(sampler.phase_bounds),
        "phases": [{n: [w, a] for n, w, a in cfg.bits} for cfg in sampler.phase_configs],
        "units": {
            n: {"kind": u.kind, "split": getattr(getattr(u, "act", None), "split", None)} for n, u in sn.units.items()
        },
        "packed_codes": packed,
        "cost": sn.cost.to_dict(),
        "format8": sn.spec.format8,  # what the 8-bit codes are: int8 affine codes or float8 e4m3 bit patterns
        "bitops_per_image": sampler.bitops(),
        "fp_bitops_per_image": sn.cost.bitops(None, len(sampler.timesteps)),
        "weight_size_bits": sampler.size_bits(),
        "source_fingerprint": sn.fingerprint,
        "files": {TENSORS: file_sha256(directory / TENSORS)},
        "info": info or {},
        "provenance": provenance(),
    }
    manifest["kind"] = sampler.parts.kind
    manifest["unet_class"] = type(sn.model.unet).__name__
    manifest["pipeline_class"] = sampler.parts.pipeline_class
    manifest["prompts"] = list(sampler.parts.prompts)
    manifest["class_labels"] = list(sampler.parts.class_labels)
    manifest["parts"] = _save_parts(sampler, directory)
    manifest["files"] |= _part_files(directory, manifest["parts"])
    write_json_atomic(directory / MANIFEST, manifest)
    (directory / CARD).write_text(_model_card(manifest))
    return directory


def _model_card(m: dict) -> str:
    ws = [w for ph in m["phases"] for w, _ in ph.values() if w is not None]
    as_ = [a for ph in m["phases"] for _, a in ph.values() if a is not None]
    info = m.get("info") or {}
    lines = [
        "# tmpq compressed sampler",
        "",
        "Load with `tmpq.load(this_directory)`; `sampler.sample(64, seed=0)` gives images in [-1, 1].",
        "",
        f"- timesteps ({len(m['timesteps'])}): {m['timesteps']}",
        f"- bit phases: {len(m['phases'])} (bounds {m['phase_bounds'] or 'none'})",
        f"- weights: mean {sum(ws) / max(len(ws), 1):.2f} bits (min {min(ws, default=0)}, max {max(ws, default=0)})",
        f"- activations: mean {sum(as_) / max(len(as_), 1):.2f} bits (min {min(as_, default=0)}, "
        f"max {max(as_, default=0)})",
        f"- cost: {m['bitops_per_image'] / 1e9:.2f} GBitOPs per image "
        f"({m['bitops_per_image'] / m['fp_bitops_per_image']:.4f} of FP at the same steps)",
        f"- weight storage: {m['weight_size_bits'] / 8 / 1024:.1f} KiB at the chosen widths "
        "(codes bit-packed; biases, scales and other parameters in fp32)",
        f"- source model fingerprint: `{m['source_fingerprint']}`",
    ]
    if m.get("kind", "pixel") != "pixel":
        lines.append(
            f"- model kind: {m['kind']} (`{m.get('unet_class')}`); full-precision parts: {sorted(m.get('parts', {}))}; "
            "`sampler.sample(4, prompts=[...])` for text-to-image, `sampler.to_diffusers()` for a diffusers pipeline"
        )
    if info.get("command"):
        lines.append(f"- produced by: `{info['command']}`")
    if info.get("fid") is not None:
        lines.append(f"- measured FID: {info['fid']:.2f} ({info.get('fid_samples', '?')} samples)")
    return "\n".join(lines) + "\n"


def load(directory: str | Path, backend=None) -> CompressedSampler:
    """`tmpq.load`: the `CompressedSampler` of an exported directory (safetensors + JSON only; checksums
    verified). Run it on integer kernels or packed weights with `.lower(backend, inplace=True)`; the `backend`
    argument is the deprecated spelling of that."""
    sampler = _read(Path(directory))
    if backend is None:
        return sampler
    warnings.warn(
        "tmpq.load(dir, backend=...) is deprecated; use tmpq.load(dir).lower(backend, inplace=True)",
        DeprecationWarning,
        stacklevel=2,
    )
    return sampler.lower(backend, inplace=True)


def _read(directory: Path) -> CompressedSampler:
    mpath, tpath = directory / MANIFEST, directory / TENSORS
    if not mpath.is_file():
        raise TmpqError(f"{directory} is not a tmpq export (no {MANIFEST}); create one with `tmpq export`")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise TmpqError(f"{mpath} is not valid JSON ({e}); the export is damaged, re-export it") from None
    if m.get("format") != FORMAT or m.get("version") not in READABLE_VERSIONS:
        raise TmpqError(
            f"{mpath} is not a {FORMAT} manifest of version {READABLE_VERSIONS}; re-export with this tmpq version"
        )
    if not tpath.is_file():
        raise TmpqError(f"{tpath} is missing; the export is incomplete, re-export it")
    expected = m.get("files", {}).get(TENSORS)
    if file_sha256(tpath) != expected:
        raise TmpqError(
            f"{tpath} does not match the checksum in {MANIFEST}: it was truncated or modified; re-export it"
        )
    for rel, digest in m.get("files", {}).items():
        if rel != TENSORS and (not (directory / rel).is_file() or file_sha256(directory / rel) != digest):
            raise TmpqError(f"{directory / rel} is missing or does not match its checksum; re-export it")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as e:
        raise TmpqError(f"{tpath} is unreadable ({e}); re-export it") from None
    try:
        return _rebuild(m, tensors, directory)
    except (KeyError, TypeError, ValueError, RuntimeError, TmpqError) as e:
        raise TmpqError(f"the export in {directory} is inconsistent or incomplete ({e}); re-export it") from None


def _load_parts(m: dict, directory: Path) -> PipelineParts:
    """The FP parts, each through its own library's `from_pretrained` on the exported subdirectory."""
    import importlib

    loaded = {}
    for name, p in m.get("parts", {}).items():
        if p.get("library") not in PART_LIBRARIES:  # the manifest names what gets imported: only these, ever
            raise TmpqError(
                f"the export's {name} part names library {p.get('library')!r}; only {PART_LIBRARIES} parts are "
                "loaded. The manifest was edited or is not a tmpq export: re-export it"
            )
        try:
            cls = getattr(importlib.import_module(p["library"]), p["class"])
        except ImportError:
            raise TmpqError(f"this export needs {p['library']!r} for its {name}: pip install 'tmpq[t2i]'") from None
        except AttributeError:
            raise TmpqError(f"{p['library']} has no class {p['class']!r} (the export's {name}); re-export it") from None
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise TmpqError(f"{p['library']}.{p['class']} is not a model or tokenizer class; re-export it")
        loaded[name] = cls.from_pretrained(str(directory / p["dir"]), **quiet_load_kwargs(cls))
    vae_key = next((k for k in ("vae", "vqvae") if k in loaded), None)
    decoder = LatentDecoder(loaded[vae_key], key=vae_key) if vae_key else None
    text = None
    if "text_encoder" in loaded:
        text = prompt_encoder(
            {k: v for k, v in loaded.items() if k.startswith(("text_encoder", "tokenizer"))}, m.get("pipeline_class")
        )
    return PipelineParts(
        m.get("kind", "pixel"),
        decoder,
        text,
        tuple(m.get("prompts", ())),
        m.get("pipeline_class"),
        tuple(int(c) for c in m.get("class_labels", ())),
    )


def _denoiser(m: dict, tensors: dict[str, torch.Tensor], schedule: NoiseSchedule):
    """The FP denoiser skeleton of the exported UNet class (weights are loaded after)."""
    import diffusers

    from tmpq.models.builtin import build_unet
    from tmpq.models.denoiser import (
        ClassDenoiser,
        FluxDenoiser,
        GuidedDenoiser,
        PixArtDenoiser,
        SD3Denoiser,
        UNetDenoiser,
    )

    unet_class = m.get("unet_class", "UNet2DModel")
    if unet_class == "UNet2DModel":
        return UNetDenoiser(build_unet(m["unet_config"]), schedule).eval()
    if unet_class == "DiTTransformer2DModel":
        dit = diffusers.DiTTransformer2DModel.from_config(m["unet_config"])
        return ClassDenoiser(dit, schedule, float(tensors["fp.guidance_scale"])).eval()
    if unet_class == "PixArtTransformer2DModel":
        pixart = diffusers.PixArtTransformer2DModel.from_config(m["unet_config"])
        size = tuple(int(v) for v in tensors["fp.resolution"].tolist())
        return PixArtDenoiser(pixart, schedule, tensors["fp.uncond"], float(tensors["fp.guidance_scale"]), size).eval()
    if unet_class == "SD3Transformer2DModel":
        sd3 = diffusers.SD3Transformer2DModel.from_config(m["unet_config"])
        return SD3Denoiser(sd3, schedule, tensors["fp.uncond"], float(tensors["fp.guidance_scale"])).eval()
    if unet_class == "FluxTransformer2DModel":
        flux = diffusers.FluxTransformer2DModel.from_config(m["unet_config"])
        size = tuple(int(v) for v in tensors["fp.latent_size"].tolist())
        g, tc = float(tensors["fp.guidance_scale"]), float(tensors.get("fp.true_cfg_scale", torch.tensor(1.0)))
        return FluxDenoiser(flux, schedule, g, size, tensors.get("fp.uncond"), tc).eval()
    if unet_class != "UNet2DConditionModel":
        raise ValueError(f"unknown UNet class {unet_class!r}")
    unet = diffusers.UNet2DConditionModel.from_config(m["unet_config"])
    return GuidedDenoiser(unet, schedule, tensors["fp.uncond"], float(tensors["fp.guidance_scale"])).eval()


def _rebuild(m: dict, tensors: dict[str, torch.Tensor], directory: Path) -> CompressedSampler:
    schedule = schedule_from_dict(m["noise_schedule"])
    den = _denoiser(m, tensors, schedule)
    phases = [QuantConfig.from_mapping({n: tuple(v) for n, v in ph.items()}) for ph in m["phases"]]
    units = m["units"]
    qt = {k[2:]: v for k, v in tensors.items() if k.startswith("q.")}
    for key, p in m["packed_codes"].items():
        qt[key] = unpack_codes(qt[key], int(p["bits"]), tuple(p["shape"]))
    state = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
    # a quantized layer's float weight is its dequantized codes (at the first width it uses): the quantized
    # twin replaces it at run time, but the module needs a weight of the right shape
    w_used, a_used, _ = _used_widths(phases)
    for name, info in units.items():
        key = f"{name}.weight"
        if info["kind"] != "matmul" and key not in state:
            b = min(w_used[name])
            codes, scale, zp = (qt[f"{name}.w{b}_{s}"] for s in ("codes", "scale", "zp"))
            state[key] = dequantize_weight(codes, scale, zp, width_format(b, m.get("format8") == "fp8_e4m3"))
    missing, unexpected = den.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"tensors do not match the UNet config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    all_w = sorted({b for s in w_used.values() for b in s}) or [8]
    all_a = sorted({b for s in a_used.values() for b in s}) or [8]
    spec = replace(QuantSpec(), w_bits=tuple(all_w), a_bits=tuple(all_a), pin=(), format8=m.get("format8", "int8"))
    sn = SuperNet(den, spec, model_fingerprint(den))
    sn.wrap_units(only=set(units))
    if set(sn.units) != set(units):
        raise ValueError("the model's quantizable layers differ from the manifest's units")
    sn.restore_units(units, qt)
    denoiser_shape = getattr(den, "sample_shape", None)
    if denoiser_shape is not None and tuple(m["sample_shape"]) != tuple(denoiser_shape):
        raise ValueError(
            f"its sample_shape {m['sample_shape']} does not match its UNet's {list(denoiser_shape)} (an edited "
            "manifest)"
        )
    sn.cost = CostModel.from_dict(m["cost"])
    sn.calibrated = True
    sn.set_fp()
    sampler = CompressedSampler(
        sn,
        schedule,
        m["timesteps"],
        phases,
        m["phase_bounds"],
        tuple(m["sample_shape"]),
        float(m["eta"]),
        parts=_load_parts(m, directory),
    )
    for _, cfg in sampler.step_configs():  # every used width must be present: fail now, not mid-sampling
        sn.set_config(cfg)
    sn.set_fp()
    sampler.info = m.get("info", {})
    return sampler
