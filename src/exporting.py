"""The run layer for export.py: one trained model as ONNX, checked against PyTorch on real images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from src.errors import UserError

log = logging.getLogger(__name__)

FORMATS = ("onnx",)


def _check_batch(check_dir: str, n: int, preprocess: Any) -> tuple[torch.Tensor, int]:
    """Up to `n` readable images spread evenly over the sorted files of `check_dir` (so several classes show up),
    preprocessed into one batch; and how many there are."""
    from src.serving import load_image
    from src.serving.files import collect_images

    if not Path(check_dir).is_dir():
        raise UserError(f"check_dir={check_dir} does not exist; pass check_dir=<a folder of real images>")
    images, _ = collect_images(check_dir)
    tensors = []
    for path in images[:: max(1, len(images) // n)]:
        try:
            tensors.append(preprocess(load_image(path)))
        except Exception:  # Pillow raises many types for broken files; the check needs good ones
            continue
        if len(tensors) == n:
            break
    if not tensors:
        raise UserError(f"check_dir={check_dir} holds no readable images; pass check_dir=<a folder of real images>")
    return torch.stack(tensors), len(tensors)


def export(cfg: DictConfig) -> Path:
    """Write `cfg.ckpt` as model.onnx to the run folder, after checking it against PyTorch; return its path."""
    from src.predicting import REF_HINT, load_model
    from src.serving import Predictor, preprocessing_from_meta
    from src.serving.onnx_model import export_onnx, onnxruntime_available, parity, read_onnx

    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(f"pass the model to export: ckpt=<model>; {REF_HINT}")
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format} is not supported; use format=onnx")
    if not onnxruntime_available():
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: pip install -r requirements.txt")
    ref = str(cfg.ckpt)
    model = load_model(ref, cfg)
    if model.is_onnx:
        raise UserError(f"ckpt={ref} is already ONNX; pass the .pth, .ckpt or MLflow model it came from")
    if len(model.nets) != 1:
        raise UserError(
            f"ckpt={ref} is an ensemble of {len(model.nets)} models; export one of them: a fold's models/*.pth, "
            f"models:/<name>/<version> or runs:/<fold run id>/exported/<file>.pth"
        )
    reference = Predictor(model.nets, model.classes, model.preprocessing, device="cpu", channels_last=False)
    batch, n = _check_batch(str(cfg.check_dir), int(cfg.check_images), reference.preprocess)
    path = Path(cfg.paths.output_dir) / "model.onnx"
    unchecked = export_onnx(model.nets[0], model.meta, path.with_name("unchecked.onnx"))
    onnx_net, onnx_meta = read_onnx(unchecked)
    exported = Predictor([onnx_net], onnx_meta["classes"], preprocessing_from_meta(onnx_meta), device="cpu")
    if exported.preprocessing != reference.preprocessing or exported.classes != reference.classes:
        raise RuntimeError(f"{unchecked} records {onnx_meta}, not the classes and preprocessing of {ref}")
    max_diff, disagree = parity(reference, exported, batch)
    print(
        f"ONNX vs PyTorch on {n} images from {cfg.check_dir}: max abs probability difference "
        f"{max_diff:.2e} (limit {cfg.tolerance:g}), argmax differs on {disagree}"
    )
    if max_diff > cfg.tolerance or disagree:
        unchecked.unlink()
        raise UserError(
            f"the ONNX export of {ref} does not match PyTorch (max abs probability difference {max_diff:.2e}, "
            f"argmax differs on {disagree} of {n} images); nothing was written"
        )
    unchecked.replace(path)
    print(f"model.onnx: {path}")
    return path
