"""Sample a model on a schedule and score it: the measurement every tmpq table is made of."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from tmpq.device import device_name, resolve_device
from tmpq.errors import TmpqError
from tmpq.fileio import read_images, save_images_atomic, write_json_atomic
from tmpq.images import save_grid
from tmpq.metrics.fid import QualityMetric, fashion_mnist_metric
from tmpq.models.loading import BUILTIN_SPEC, LoadedModel, load_model
from tmpq.provenance import file_sha256, provenance
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import validate_timesteps
from tmpq.serialization import DictConfig


@dataclass(frozen=True)
class EvalConfig(DictConfig):
    """One FP evaluation: which model, which schedule, how many samples from which seeds."""

    model: str = BUILTIN_SPEC
    steps: int = 10
    schedule: str = "quad"
    timesteps: tuple[int, ...] | None = None  # an explicit list overrides steps/schedule
    num_samples: int = 1000
    seed: int = 0
    eta: float = 0.0
    batch_size: int = 100
    reference: str = "fashion-mnist"
    compressed: str | None = None  # an exported sampler (`tmpq export`): its own timesteps and bits are used
    backend: str | None = None  # run `compressed` on a tmpq.runtime backend: int8 | packed | fake (None: super-network)
    dtype: str = "float32"  # float arithmetic around the quantized layers with `backend` (float32 | bfloat16 | float16)

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise TmpqError(f"--num-samples must be >= 2 for FID, got {self.num_samples}")
        if self.batch_size < 1:
            raise TmpqError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise TmpqError(f"--eta must be a number >= 0, got {self.eta}")
        if self.backend is not None and self.compressed is None:
            raise TmpqError("--backend runs an exported sampler: give --compressed DIR with it, or drop --backend")
        if self.compressed is not None and self.timesteps is not None:
            raise TmpqError("--compressed samples on its own timesteps; drop --timesteps/--steps/--schedule")

    def resolved_timesteps(self, schedule) -> list[int]:
        """The sampling timesteps on `schedule` (a NoiseSchedule or FlowSchedule): the given list, or the named one."""
        if self.timesteps is not None:
            return validate_timesteps(self.timesteps, schedule.num_train_timesteps)
        return schedule.timesteps(self.schedule, self.steps)


@dataclass(frozen=True)
class EvalResult:
    config: EvalConfig
    timesteps: list[int]
    fid: float
    fid_halves: tuple[float, float] | None  # FIDs of the first and the second half: the error bar (each biased up)
    inception_score: float
    inception_score_std: float
    sample_wall_s: float
    score_wall_s: float
    image_forwards: int
    provenance: dict = field(default_factory=dict)
    # against another sampler's images from the same seeds (`evaluate(compare_to=...)`): "fid" (FID between the two
    # sets) and "psnr_db" (per image, averaged; images in [-1, 1], peak-to-peak 2); None when not asked
    fidelity: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def reference_metric(reference: str) -> QualityMetric:
    if reference == "fashion-mnist":
        return fashion_mnist_metric("train")
    from tmpq.data import load_image_folder

    folder = Path(reference)
    if not folder.is_dir():
        raise TmpqError(f"reference {reference!r} is neither 'fashion-mnist' nor a folder of images")
    return QualityMetric(reference=lambda: load_image_folder(folder), reference_key=f"folder:{folder.resolve()}")


IMAGES = "images.safetensors"
"""Where `evaluate(save_images=True)` keeps the images it scored (float32, key "images"), for `compare_to`."""

PARTIAL = "tmpq_partial"
"""Where `evaluate` keeps the batches sampled so far (OUT/tmpq_partial/), so a killed run resumes; removed when
done. A folder of that name that `evaluate` did not write is never touched."""
_PARTIAL_STAMP = "evaluate.json"


def saved_images(out_dir: Path | str) -> torch.Tensor:
    """The images an `evaluate(..., save_images=True)` into `out_dir` scored: what `compare_to` takes."""
    path = Path(out_dir) / IMAGES
    try:
        return read_images(path)
    except (OSError, KeyError, SafetensorError) as e:
        raise TmpqError(
            f"{path} holds no saved images ({e}); evaluate that sampler with save_images=True "
            "(`tmpq eval --save-images`)"
        ) from None


def _clear_batches(partial: Path) -> None:
    """Remove the batch files `_sample_resumable` writes (finished and half-written), nothing else."""
    for old in [*partial.glob("*.safetensors"), *partial.glob("*.tmp")]:
        old.unlink()


def _sample_resumable(
    sample: Callable[[int, int], torch.Tensor],
    cfg: EvalConfig,
    out: Path | None,
    device: str,
    progress: bool,
    steps: int,
    inputs_sha256: dict[str, str],
) -> torch.Tensor:
    """cfg.num_samples images as `sample(start, count)` gives them (sample i from seed cfg.seed + i), batch by batch.
    With `out`, each batch is saved to OUT/tmpq_partial/ as it finishes and reused by a re-run of the same config on
    the same device and the same input files (by SHA-256: retrained weights at the same path are another model):
    the batches are the ones an uninterrupted run makes, so the result is the same tensor."""
    n, bs = cfg.num_samples, cfg.batch_size
    partial = None if out is None else out / PARTIAL
    stamp = {"written_by": "tmpq evaluate", "config": cfg.to_dict(), "device": device, "inputs_sha256": inputs_sha256}
    stamp = json.dumps(stamp, sort_keys=True)
    if partial is not None:
        if partial.exists():
            mark = partial / _PARTIAL_STAMP
            ours = mark.is_file() and '"written_by": "tmpq evaluate"' in mark.read_text(errors="replace")
            if not ours:
                raise TmpqError(
                    f"{partial} exists and was not written by tmpq's evaluation; it is left untouched: "
                    "pick another --out or move it"
                )
            if mark.read_text() != stamp:  # our batches, of another config or device: not this run's
                _clear_batches(partial)
        partial.mkdir(parents=True, exist_ok=True)
        (partial / _PARTIAL_STAMP).write_text(stamp)
    batches = []
    bar = tqdm(total=n, desc=f"sample ({steps} steps)", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, bs):
        count = min(bs, n - start)
        path = None if partial is None else partial / f"{start:08d}.safetensors"
        if path is not None and path.is_file():
            batch = read_images(path)
        else:
            batch = sample(start, count)
            if path is not None:
                save_images_atomic(path, batch)
        batches.append(batch)
        bar.update(count)
    bar.close()
    return torch.cat(batches)


def fidelity_to(images: torch.Tensor, reference: torch.Tensor, metric: QualityMetric) -> dict[str, float]:
    """How far `images` are from another sampler's `reference` images from the same seeds: FID between the two sets
    and the mean per-image PSNR (pixels in [-1, 1])."""
    ref = reference.float().clamp(-1, 1)
    mse = (images.float().clamp(-1, 1) - ref).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return {"fid": metric.fid_between(images, ref), "psnr_db": float((10 * torch.log10(4 / mse)).mean())}


def evaluate(
    cfg: EvalConfig,
    out_dir: Path | str | None = None,
    loaded: LoadedModel | None = None,
    metric: QualityMetric | None = None,
    progress: bool = True,
    device: str = "cpu",
    compare_to: torch.Tensor | None = None,
    save_images: bool = False,
) -> EvalResult:
    """Generate cfg.num_samples images (sample i from seed cfg.seed + i) on `device`, score FID/IS, write eval.json
    + grid. The device is recorded with the result: samples differ across devices by float rounding. With `out_dir`,
    an unconditional model's batches are kept as they finish, so re-running a killed evaluation resumes it.

    `compare_to`: another sampler's images from the same seeds (e.g. the FP model's, kept by `save_images`, which
    writes OUT/images.safetensors); the result's `fidelity` then says how far this sampler is from that one."""
    metric = metric or reference_metric(cfg.reference)
    if compare_to is not None and compare_to.shape[0] != cfg.num_samples:
        raise TmpqError(
            f"compare_to holds {compare_to.shape[0]} images, this evaluation makes {cfg.num_samples}; compare samplers "
            "on the same seeds and sample count"
        )
    if save_images and out_dir is None:
        raise TmpqError("save_images writes OUT/images.safetensors: give an output directory")
    target = resolve_device(device)
    if cfg.compressed is not None:
        from tmpq.export import MANIFEST, TENSORS, load
        from tmpq.runtime import Backend

        backend = None if cfg.backend is None else Backend(mode=cfg.backend, dtype=cfg.dtype, device=str(target))
        compressed = load(cfg.compressed)
        if backend is not None:
            compressed = compressed.lower(backend, inplace=True)
        else:
            compressed.to(target)
        timesteps = list(compressed.timesteps)
        inputs = {"compressed": Path(cfg.compressed) / TENSORS, "manifest": Path(cfg.compressed) / MANIFEST}
        kind = compressed.parts.kind

        def sample(start: int, count: int) -> torch.Tensor:
            return compressed.sample(count, cfg.seed + start, cfg.batch_size)
    else:
        loaded = (loaded or load_model(cfg.model)).to(target)
        timesteps = cfg.resolved_timesteps(loaded.schedule)
        sampler = DDIMSampler(loaded.schedule, timesteps, eta=cfg.eta)
        inputs = {"model": loaded.weights_path} if loaded.weights_path else {}
        kind = loaded.kind

        def sample(start: int, count: int) -> torch.Tensor:  # conditional models: one call from sample 0 (below)
            den, shape, cond = loaded.denoiser, loaded.sample_shape, loaded.conditioning(count)
            out = generate(den, sampler, count, shape, cfg.seed + start, cfg.batch_size, progress=False, cond=cond)
            return loaded.decode(out)

    out = None if out_dir is None else Path(out_dir)
    hashes = {k: file_sha256(v) for k, v in inputs.items() if Path(v).is_file()}  # once: batch stamp and provenance
    t0 = time.time()
    if kind in ("pixel", "latent"):  # sample i depends on i alone: batch by batch, resumable
        images = _sample_resumable(sample, cfg, out, device_name(target), progress, len(timesteps), hashes)
    else:  # prompts / labels cycle from the first sample: one call
        images = sample(0, cfg.num_samples)
    t1 = time.time()
    scores = metric.score(images, seed=cfg.seed)
    half = cfg.num_samples // 2
    halves = None
    if half >= 2:
        halves = (metric.fid(images[:half]), metric.fid(images[half:]))
    fidelity = None
    if compare_to is not None:
        if compare_to.shape != images.shape:
            raise TmpqError(f"compare_to images are {tuple(compare_to.shape)}, this sampler's {tuple(images.shape)}")
        fidelity = fidelity_to(images, compare_to, metric)
    t2 = time.time()
    result = EvalResult(
        config=cfg,
        timesteps=timesteps,
        fid=scores.fid,
        fid_halves=halves,
        inception_score=scores.inception_score,
        inception_score_std=scores.inception_score_std,
        sample_wall_s=round(t1 - t0, 2),
        score_wall_s=round(t2 - t1, 2),
        image_forwards=cfg.num_samples * len(timesteps),
        provenance=provenance()
        | {"inputs_sha256": hashes, "feature_space": scores.feature_space, "device": device_name(target)},
        fidelity=fidelity,
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", nrow=8)
        if save_images:
            save_images_atomic(out / IMAGES, images)
        write_json_atomic(out / "eval.json", result.to_json(), indent=2)
        if (out / PARTIAL / _PARTIAL_STAMP).is_file():  # ours: the batches, then the stamp, then the folder
            _clear_batches(out / PARTIAL)
            (out / PARTIAL / _PARTIAL_STAMP).unlink()
            with contextlib.suppress(OSError):  # a file someone else put there keeps the folder
                (out / PARTIAL).rmdir()
    return result
