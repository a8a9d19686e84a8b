"""Sample a model on a schedule and score it: the measurement every tmpq table is made of."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tmpq.device import device_name, resolve_device
from tmpq.errors import TmpqError
from tmpq.fileio import write_json_atomic
from tmpq.images import save_grid
from tmpq.metrics.fid import QualityMetric, fashion_mnist_metric
from tmpq.models.loading import BUILTIN_SPEC, LoadedModel, load_model
from tmpq.provenance import provenance
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
    inception_score: float
    inception_score_std: float
    sample_wall_s: float
    score_wall_s: float
    image_forwards: int
    provenance: dict = field(default_factory=dict)

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


def evaluate(
    cfg: EvalConfig,
    out_dir: Path | str | None = None,
    loaded: LoadedModel | None = None,
    metric: QualityMetric | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> EvalResult:
    """Generate cfg.num_samples images (sample i from seed cfg.seed + i) on `device`, score FID/IS, write eval.json
    + grid. The device is recorded with the result: samples differ across devices by float rounding."""
    metric = metric or reference_metric(cfg.reference)
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
        t0 = time.time()
        images = compressed.sample(cfg.num_samples, cfg.seed, cfg.batch_size, progress=progress)
    else:
        loaded = (loaded or load_model(cfg.model)).to(target)
        timesteps = cfg.resolved_timesteps(loaded.schedule)
        sampler = DDIMSampler(loaded.schedule, timesteps, eta=cfg.eta)
        inputs = {"model": loaded.weights_path} if loaded.weights_path else {}
        t0 = time.time()
        images = generate(
            loaded.denoiser, sampler, cfg.num_samples, loaded.sample_shape, cfg.seed, cfg.batch_size, progress=progress
        )
    t1 = time.time()
    scores = metric.score(images, seed=cfg.seed)
    t2 = time.time()
    result = EvalResult(
        config=cfg,
        timesteps=timesteps,
        fid=scores.fid,
        inception_score=scores.inception_score,
        inception_score_std=scores.inception_score_std,
        sample_wall_s=round(t1 - t0, 2),
        score_wall_s=round(t2 - t1, 2),
        image_forwards=cfg.num_samples * len(timesteps),
        provenance=provenance(inputs) | {"feature_space": scores.feature_space, "device": device_name(target)},
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_grid(images[:64], out / "samples.png", nrow=8)
        write_json_atomic(out / "eval.json", result.to_json(), indent=2)
    return result
