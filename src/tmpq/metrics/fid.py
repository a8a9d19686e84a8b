"""FID, KID and IS, in the feature space of the shipped classifier (or Inception; FID and IS only).

Reference statistics of the real data (feature sum, covariance sum, count; for KID a fixed subset's features)
are cached as safetensors keyed by the feature extractor's checksum and the data source, so a search that
scores hundreds of candidates computes them once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from tmpq.errors import TmpqError
from tmpq.metrics.classifier import BUILTIN_CLASSIFIER, FashionClassifier, load_classifier
from tmpq.provenance import file_sha256

_STATE_KEYS = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
KID_REFERENCE_SIZE = 10_000
"""How many reference images KID compares with: a fixed, seeded subset (all of them if fewer). 128 generated samples
against 10,000 leave the estimate's spread to the generated side."""


class _Features(nn.Module):
    """Penultimate features for FID (torchmetrics reads `num_features`)."""

    def __init__(self, clf: FashionClassifier) -> None:
        super().__init__()
        self.clf = clf
        self.num_features = clf.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf.features(x)


class _Logits(nn.Module):
    """Class logits for IS (torchmetrics applies the softmax)."""

    def __init__(self, clf: FashionClassifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x)


def default_cache_dir() -> Path:
    root = os.environ.get("TMPQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tmpq"
    )
    return Path(root)


@dataclass(frozen=True)
class QualityScores:
    fid: float
    inception_score: float
    inception_score_std: float
    num_samples: int
    feature_space: str


class QualityMetric:
    """FID + IS of generated images against one reference set, with cached reference statistics.

    `feature_space="classifier"` (default) uses the shipped Fashion-MNIST classifier on
    (N, 1, 32, 32) images in [-1, 1]. `feature_space="inception"` uses torchmetrics' Inception
    with a local weights file (`inception_weights`), for RGB models; it needs `torch-fidelity`.
    """

    def __init__(
        self,
        reference: Callable[[], torch.Tensor],
        reference_key: str,
        classifier_path: Path | str = BUILTIN_CLASSIFIER,
        feature_space: str = "classifier",
        inception_weights: Path | str | None = None,
        cache_dir: Path | str | None = None,
        batch_size: int = 500,
    ) -> None:
        self.batch_size = batch_size
        self.feature_space = feature_space
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if feature_space == "classifier":
            clf = load_classifier(classifier_path)
            self._fid_feature: nn.Module | int = _Features(clf)
            self._is_feature: nn.Module | str = _Logits(clf)
            extractor_id = file_sha256(classifier_path)[:16]
        elif feature_space == "inception":
            if inception_weights is None or not Path(inception_weights).is_file():
                raise TmpqError(
                    "Inception FID needs a local weights file (pt_inception-2015-12-05); "
                    "pass --inception-weights PATH. It cannot be downloaded here."
                )
            self._fid_feature, self._is_feature = 2048, _inception_logits(inception_weights)
            extractor_id = "inception-" + file_sha256(inception_weights)[:16]
        else:
            raise TmpqError(f"unknown feature space {feature_space!r}; use 'classifier' or 'inception'")
        self.inception_weights = str(inception_weights) if inception_weights else None
        self.cache_path = self.cache_dir / f"fid_ref_{extractor_id}_{_slug(reference_key)}.safetensors"
        self.kid_cache_path = self.cache_dir / f"kid_ref_{extractor_id}_{_slug(reference_key)}.safetensors"
        self._reference = reference
        self._ref_state: dict[str, torch.Tensor] | None = None
        self._kid_ref: dict[str, torch.Tensor] | None = None

    def _new_fid(self) -> FrechetInceptionDistance:
        kwargs = {"feature_extractor_weights_path": self.inception_weights} if self.inception_weights else {}
        try:
            fid = FrechetInceptionDistance(feature=self._fid_feature, reset_real_features=False, **kwargs)
        except ModuleNotFoundError as exc:
            raise TmpqError(
                f"Inception FID needs torch-fidelity: `pip install --no-deps torch-fidelity` ({exc})"
            ) from exc
        return fid  # its feature sums are float64 already

    def reference_state(self) -> dict[str, torch.Tensor]:
        """Real-data FID statistics, from the cache or computed once and cached (atomic write)."""
        if self._ref_state is None:
            self._ref_state = self._cached(self.cache_path, lambda: self.stats(self._reference()))
        return self._ref_state

    def _cached(self, path: Path, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if path.is_file():
            try:
                return load_file(str(path))
            except Exception:
                pass  # damaged cache: recompute below, never trust it
        state = make()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(path)
        return state

    def kid_reference(self) -> dict[str, torch.Tensor]:
        """KID's side of the real data: the features of a fixed subset of the reference (KID_REFERENCE_SIZE images,
        seeded) and the mean kernel between them, cached like the FID statistics."""
        if self._kid_ref is None:

            def make() -> dict[str, torch.Tensor]:
                real = self._reference()
                g = torch.Generator().manual_seed(0)
                keep = torch.randperm(real.shape[0], generator=g)[:KID_REFERENCE_SIZE]
                feats = self.features(real[keep.sort().values]).double()
                return {"features": feats, "kernel_mean": _mean_off_diagonal_kernel(feats).reshape(1)}

            self._kid_ref = self._cached(self.kid_cache_path, make)
        return self._kid_ref

    @torch.no_grad()
    def kid(self, images: torch.Tensor) -> float:
        """Kernel Inception Distance (Bińkowski et al., 2018) against the reference, in this metric's feature space:
        the unbiased estimate of the squared MMD under the cubic polynomial kernel (x·y/d + 1)³, as torchmetrics'
        KernelInceptionDistance computes it, but over every generated sample against one fixed reference subset
        (no random subsets, so it is deterministic). Unlike FID it needs no covariance: FID on 128 samples in the
        classifier's 128-d space estimates a rank-deficient covariance and swings with the seeds."""
        if images.shape[0] < 2:
            raise TmpqError("KID needs at least 2 generated images")
        if self.feature_space != "classifier":
            raise TmpqError("KID is computed in the classifier feature space only; score Inception features by FID")
        ref = self.kid_reference()
        x, y = self.features(images).double(), ref["features"]
        k_xy = _poly_kernel(x, y).mean()
        return float(_mean_off_diagonal_kernel(x) + ref["kernel_mean"][0] - 2 * k_xy)

    def _feed(self, fid: FrechetInceptionDistance, images: torch.Tensor, real: bool) -> None:
        """Add `images` to one side of `fid`, in batches."""
        for i in range(0, images.shape[0], self.batch_size):
            fid.update(self._prep(images[i : i + self.batch_size]), real=real)

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(images).all():
            raise TmpqError("generated images contain NaN/inf; the sampler or quantized model diverged")
        if self.feature_space == "inception":  # torchmetrics Inception wants uint8 RGB in [0, 255]
            x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return images.clamp(-1, 1).float()

    @torch.no_grad()
    def fid(self, images: torch.Tensor) -> float:
        return self._fid_against(self.reference_state(), images)

    def _fid_against(self, state: dict[str, torch.Tensor], images: torch.Tensor) -> float:
        """FID of `images` against the real-side statistics `state`."""
        if images.shape[0] < 2:
            raise TmpqError("FID needs at least 2 generated images")
        fid = self._new_fid()
        for k, v in state.items():
            setattr(fid, k, v.clone())
        self._feed(fid, images, real=False)
        return float(fid.compute())

    @torch.no_grad()
    def stats(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """FID statistics of an image set: the real data's (`reference_state`), or a generated set's that many sets
        are compared with (`fid_between(..., reference_stats=)`) without extracting its features again for each."""
        if images.shape[0] < 2:
            raise TmpqError("FID needs at least 2 images on each side")
        fid = self._new_fid()
        self._feed(fid, images, real=True)
        return {k: getattr(fid, k).clone() for k in _STATE_KEYS}

    @torch.no_grad()
    def fid_between(
        self,
        images: torch.Tensor,
        reference_images: torch.Tensor | None = None,
        *,
        reference_stats: dict[str, torch.Tensor] | None = None,
    ) -> float:
        """FID of `images` against another generated set instead of the real data: with the FP model's samples from
        the same seeds as `reference_images`, how far quantization moved the sampler ("FID to FP", as MixDQ and
        ViDiT-Q report it), whatever the real-data FID reads into an offset. Pass `reference_stats` (from `stats`)
        instead of the images when one set is compared with many."""
        if (reference_images is None) == (reference_stats is None):
            raise TmpqError("fid_between needs the reference images or their statistics (one of them)")
        state = reference_stats if reference_stats is not None else self.stats(reference_images)
        return self._fid_against(state, images)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The FID feature vectors of `images` (classifier space only): for sample-by-sample distances."""
        if not isinstance(self._fid_feature, nn.Module):
            raise TmpqError("per-sample features are only available in the classifier feature space")
        step = self.batch_size
        return torch.cat([self._fid_feature(self._prep(images[i : i + step])) for i in range(0, len(images), step)])

    @torch.no_grad()
    def inception_score(self, images: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
        metric = InceptionScore(feature=self._is_feature, splits=min(splits, images.shape[0]))
        for i in range(0, images.shape[0], self.batch_size):
            metric.update(self._prep(images[i : i + self.batch_size]))
        with torch.random.fork_rng():  # IS shuffles before splitting; keep it deterministic
            torch.manual_seed(seed)
            mean, std = metric.compute()
        return float(mean), float(std)

    def score(self, images: torch.Tensor, seed: int = 0) -> QualityScores:
        is_mean, is_std = self.inception_score(images, seed=seed)
        return QualityScores(
            fid=self.fid(images),
            inception_score=is_mean,
            inception_score_std=is_std,
            num_samples=int(images.shape[0]),
            feature_space=self.feature_space,
        )


def _inception_logits(weights: Path | str) -> nn.Module:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["logits_unbiased"], feature_extractor_weights_path=str(weights)
        )
    except ModuleNotFoundError as exc:
        raise TmpqError(
            f"Inception FID/IS needs torch-fidelity: `pip install --no-deps torch-fidelity` ({exc})"
        ) from exc


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mean_off_diagonal_kernel(x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean of k(x_i, x_j) over i ≠ j, in row chunks (10,000² doubles would be 800 MB at once)."""
    n, total = x.shape[0], x.new_zeros(())
    for i in range(0, n, chunk):
        block = _poly_kernel(x[i : i + chunk], x)
        total = total + block.sum() - block.diagonal(offset=i).sum()
    return total / (n * (n - 1))


def _slug(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fashion_mnist_metric(split: str = "train", **kwargs) -> QualityMetric:
    """The default metric: classifier FID/IS against the Fashion-MNIST split (train: 60,000 images)."""
    from tmpq.data import FASHION_MNIST_DIR, load_fashion_mnist

    return QualityMetric(
        reference=lambda: load_fashion_mnist(split)[0],
        reference_key=f"fashion-mnist:{FASHION_MNIST_DIR}:{split}",
        **kwargs,
    )
