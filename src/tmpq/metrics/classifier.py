"""A small Fashion-MNIST classifier whose feature space replaces Inception for FID/IS.

Inception weights cannot be downloaded here, and Inception features of 32x32 grey clothing are
a poor fit anyway; a classifier trained on the data itself gives a feature space in which the
ten classes separate, which is what FID needs to see mode dropping and blur.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from tmpq.errors import TmpqError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_CLASSIFIER = ASSETS / "fashion_classifier.safetensors"


def _block(cin: int, cout: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class FashionClassifier(nn.Module):
    """CNN on (N, 1, 32, 32) images in [-1, 1]; `features` is the 128-d penultimate layer."""

    num_features = 128
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        # Cheap at full resolution (one conv), deeper at 16x16: ~19 M MACs per image.
        self.body = nn.Sequential(_block(1, 32, 1), _block(32, 64, 2), _block(64, 128, 1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(128 * 4 * 4, self.num_features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(self.num_features, self.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 32, 32):
            raise TmpqError(
                f"the Fashion-MNIST classifier takes (N, 1, 32, 32) images, got {tuple(x.shape)}; "
                "pad 28x28 images to 32x32 (tmpq.data.to_model_range does this)"
            )
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> tuple[FashionClassifier, dict]:
    """Train with light augmentation (flips, 2-pixel shifts); returns the model and training facts."""
    torch.manual_seed(seed)
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm(total=steps, desc="classifier", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(n // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            x, y = images[idx], labels[idx]
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_wall_s": round(time.time() - start, 1),
    }


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / images.shape[0]


def save_classifier(model: FashionClassifier, path: Path | str, info: dict) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"info": json.dumps(info)})


def load_classifier(path: Path | str = BUILTIN_CLASSIFIER) -> FashionClassifier:
    """Load classifier weights (safetensors only, never a pickle), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise TmpqError(
            f"classifier weights {path} not found; reinstall tmpq or run `tmpq train-classifier --out {path}`"
        )
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise TmpqError(f"{path} is not a readable safetensors file ({exc}); retrain it") from exc
    model = FashionClassifier()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TmpqError(f"{path} does not hold FashionClassifier weights; retrain it") from exc
    return model.eval()


def classifier_info(path: Path | str = BUILTIN_CLASSIFIER) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("info", "{}"))
