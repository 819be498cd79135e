"""Evaluation preprocessing (resize, centre crop, interpolation, mean/std) resolved once per run.

Pretrained torchvision weights were trained and scored with their own preprocessing (resnet50's IMAGENET1K_V2:
resize 232, crop 224; efficientnet's: bicubic), so a model fine-tuned from them sees its best input when ours
matches. That recipe is read from the weights enum's `transforms` (no download); explicit `data.*` settings win.
The data transforms (src/data.py) and the model metadata (src/model.py) share these definitions, so neither
imports the other; the run layer passes the resolved values to both, and every saved model carries them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from src.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
DEFAULT_INTERPOLATION = "bilinear"
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resize_size`, centre-crop `crop_size`, normalise; `source` says where from."""

    crop_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "source"}


def is_weights_file(weights: str | None) -> bool:
    """A local state-dict file rather than a torchvision weights enum name (src.model decides the same way)."""
    return weights is not None and (Path(weights).suffix in {".pth", ".pt", ".bin"} or "/" in str(weights))


def weights_preprocessing(backbone: str, weights: str | None) -> dict[str, Any] | None:
    """crop_size, resize_size, interpolation, mean, std of a torchvision weights enum; None for a file or null.

    `transforms` is a functools.partial of torchvision's ImageClassification: building it reads no file.
    """
    if weights is None or is_weights_file(weights):
        return None
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(backbone)[str(weights)].transforms()
        resize, crop = preset.resize_size, preset.crop_size
        return {
            "crop_size": int(crop[0] if isinstance(crop, list | tuple) else crop),
            "resize_size": int(resize[0] if isinstance(resize, list | tuple) else resize),
            "interpolation": preset.interpolation.value,
            "mean": tuple(float(m) for m in preset.mean),
            "std": tuple(float(s) for s in preset.std),
        }
    except (KeyError, ValueError, AttributeError, TypeError):  # unknown names: src.model says what to do
        return None


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise UserError(f"{key}={value} must be a whole number of pixels >= 1, or null")
    return int(value)


def _triple(value: Any, key: str) -> tuple[float, ...]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or (key == "data.std" and min(triple) <= 0):
        raise UserError(f"{key}={value} must be three numbers, one per RGB channel{' (> 0)' * (key == 'data.std')}")
    return triple


def resolve_preprocessing(
    backbone: str,
    weights: str | None,
    image_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
    mean: Any = None,
    std: Any = None,
) -> Preprocessing:
    """The run's preprocessing: each explicit setting wins, each null falls back to the weights' own, then to
    224 px, bilinear and the ImageNet statistics.

    A null `resize_size` keeps the weights' resize-to-crop ratio (232/224 for resnet50 V2), so that an explicit
    `image_size` with pretrained weights resizes in the same proportion; without weights metadata it equals the
    crop, as this project always did.
    """
    preset = weights_preprocessing(backbone, weights)
    crop = _positive_int(image_size, "data.image_size") if image_size is not None else None
    if crop is None:
        crop = preset["crop_size"] if preset else DEFAULT_SIZE
    if resize_size is not None:
        resize = _positive_int(resize_size, "data.resize_size")
    elif preset:
        resize = max(crop, round(crop * preset["resize_size"] / preset["crop_size"]))
    else:
        resize = crop
    if resize < crop:
        raise UserError(f"data.resize_size={resize} is smaller than the crop data.image_size={crop}; raise it or null")
    interp = str(interpolation) if interpolation is not None else preset["interpolation"] if preset else None
    interp = interp or DEFAULT_INTERPOLATION
    if interp not in INTERPOLATIONS:
        raise UserError(f"data.interpolation={interp} is not one of {', '.join(INTERPOLATIONS)}, or null")
    source = f"{backbone} {weights}" if preset else "defaults"
    return Preprocessing(
        crop_size=crop,
        resize_size=resize,
        interpolation=interp,
        mean=_triple(mean, "data.mean") if mean is not None else preset["mean"] if preset else IMAGENET_MEAN,
        std=_triple(std, "data.std") if std is not None else preset["std"] if preset else IMAGENET_STD,
        source=source,
    )
