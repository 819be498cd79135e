"""The fold-ensemble MLflow model (models-from-code) and the one predictor behind predict.py, test.py and serving.

Self-contained on purpose: this file imports only torch, torchvision, numpy, pandas, PIL, mlflow and the standard
library, because MLflow copies it into the logged model and `mlflow.pyfunc.load_model` runs it in a process that
has never seen this repository. The repository imports the same file as `src.serving.ensemble_model`, so the
served model, predict.py and test.py share one prediction path: decode -> resize + centre crop + normalise ->
k networks -> mean of their softmax probabilities (optionally over the image and its mirror image), with the
logits divided by a temperature first.

An ensemble is a folder holding `ensemble.json` and the k model files (`model_<i>.pth`: a torchvision state dict
plus classes, backbone and image settings, read with `torch.load(weights_only=True)`, so loading runs no pickled
code). MLflow's pyfunc input is a DataFrame with a column `image` (base64 of the image file's bytes) or `path`
(a local image file); its output has `predicted` (class name), `confidence` (its probability) and one column
`prob_<class>` per class, in the model's class order.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode, v2

FORMAT = 1
CONFIG_FILE = "ensemble.json"
KIND = "cv_ensemble"
TTA_MODES = ("none", "hflip")
PROB_PREFIX = "prob_"
# Image files that a `path` input may name: the ones training reads.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, exactly as training decodes (src.data.to_rgb; tests check they agree):
    16-bit grey is scaled rather than clipped, and transparency is flattened onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image file (a path, or the file's bytes) as RGB, turned upright as its EXIF orientation says;
    raises on anything Pillow cannot read whole."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()  # decode before the file closes; to_rgb may return this very image
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def preprocessing_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """Resize, crop, interpolation and normalisation of a model file's metadata.

    `resize_size`, `crop_size` and `interpolation` win when present; otherwise both sizes are `image_size` and the
    interpolation is bilinear, which is what training's `src.data.build_transform` does.
    """
    size = meta.get("image_size")
    return {
        "resize_size": meta.get("resize_size") or size,
        "crop_size": meta.get("crop_size") or size,
        "interpolation": str(meta.get("interpolation") or "bilinear"),
        "mean": [float(m) for m in meta["mean"]],
        "std": [float(s) for s in meta["std"]],
    }


def build_preprocess(preprocessing: dict[str, Any]) -> v2.Compose:
    """PIL image -> normalised float (3, H, W): resize the short side, centre-crop, scale to [0, 1], normalise."""
    try:
        interpolation = InterpolationMode(preprocessing["interpolation"])
    except ValueError:
        names = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"interpolation {preprocessing['interpolation']!r} is not one of {names}") from None
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(preprocessing["resize_size"], interpolation=interpolation, antialias=True),
            v2.CenterCrop(preprocessing["crop_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(preprocessing["mean"]), list(preprocessing["std"])),
        ]
    )


def load_model_file(path: str | Path, network_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A torchvision network (eval mode) and its metadata from a model file, with no pickled code run.

    `network_kwargs` are further `torchvision.models.get_model` arguments that some backbones need to take
    the saved layout (src.model.native_kwargs; recorded in ensemble.json when the ensemble is saved).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    kwargs = {"num_classes": len(saved["classes"]), **(network_kwargs or {})}
    return torchvision_network(saved["backbone"], saved["state_dict"], kwargs), {
        k: v for k, v in saved.items() if k != "state_dict"
    }


def torchvision_network(name: str, state: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> nn.Module:
    """`torchvision.models.get_model(name, **kwargs)` in eval mode, holding `state`.

    Built on the meta device and given `state`'s tensors: the random initialisation that `state` overwrites
    took two thirds of loading a resnet18. A model with tensors that `state` cannot hold (non-persistent buffers
    or plain tensor attributes, computed in its constructor) or a state in other dtypes is built and filled the
    ordinary way.
    """
    kwargs = {"weights": None, **kwargs}
    try:
        with torch.device("meta"):
            skeleton = torchvision.models.get_model(name, **kwargs)
    except Exception:  # a constructor that reads tensor values (regnet's widths) cannot run on meta
        skeleton = None
    if skeleton is not None and _holds_only(skeleton, state):
        skeleton.load_state_dict(state, assign=True)
        if not any(  # a plain tensor attribute, which no state dict fills
            isinstance(value, torch.Tensor) and value.is_meta for m in skeleton.modules() for value in vars(m).values()
        ):
            return skeleton.eval()
    net = torchvision.models.get_model(name, **kwargs)
    net.load_state_dict(state)
    return net.eval()


def _holds_only(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `state` has every tensor of `skeleton`, each in its dtype, and the skeleton keeps no buffer outside
    its state dict."""
    expected = skeleton.state_dict()
    return set(dict(skeleton.named_buffers())) <= expected.keys() and all(
        key in state and state[key].dtype == tensor.dtype for key, tensor in expected.items()
    )


def common_settings(metas: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The classes and preprocessing that all models of an ensemble share; raises when they differ."""
    classes, preprocessing = list(metas[0]["classes"]), preprocessing_from_meta(metas[0])
    for i, meta in enumerate(metas[1:], 1):
        if list(meta["classes"]) != classes:
            raise ValueError(f"model {i} has classes {list(meta['classes'])}, model 0 has {classes}")
        if preprocessing_from_meta(meta) != preprocessing:
            raise ValueError(f"model {i} preprocesses {preprocessing_from_meta(meta)}, model 0 {preprocessing}")
    return classes, preprocessing


def check_options(tta: str, temperature: float) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"tta={tta!r} is not one of {', '.join(TTA_MODES)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")


def _read_meta(path: str | Path) -> dict[str, Any]:
    """A model file's metadata; its tensors are memory-mapped, not read (a ResNet18 file: 23 ms instead of 51)."""
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # torch's legacy file format cannot be mapped
        meta = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in meta.items() if k != "state_dict"}


def _copy(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or one without hard links
            pass
    shutil.copyfile(source, target)


def save_ensemble(
    directory: str | Path,
    model_files: Sequence[str | Path],
    *,
    tta: str = "none",
    temperature: float = 1.0,
    network_kwargs: Callable[[str], dict[str, Any]] | None = None,
    link: bool = False,
    metas: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Copy k model files into `directory` as model_<i>.pth and describe them in ensemble.json; return that.

    `network_kwargs(backbone)` gives the extra get_model arguments each model is rebuilt with (see load_model_file).
    `link=True` hard-links the files where the file system allows, for a staging folder that is copied elsewhere
    and deleted: a copy there would be written only to be copied again. `metas`: each file's metadata, when
    the caller wrote the file and has it (reading it back maps the file: ~10 ms for ResNet18).
    """
    check_options(tta, temperature)
    if not model_files:
        raise ValueError("an ensemble needs at least one model file")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if metas is not None and len(metas) != len(model_files):
        raise ValueError(f"{len(metas)} metadata entries for {len(model_files)} model files")
    metas = list(metas) if metas is not None else [_read_meta(path) for path in model_files]
    classes, preprocessing = common_settings(metas)
    models = []
    for i, (path, meta) in enumerate(zip(model_files, metas, strict=True)):
        _copy(Path(path), directory / f"model_{i}.pth", link)
        keep = ("backbone", "fold", "best_val_accuracy", "mlflow_run_id")
        entry = {"file": f"model_{i}.pth", "source": Path(path).name, **{k: meta[k] for k in keep if k in meta}}
        models.append({**entry, "network_kwargs": network_kwargs(meta["backbone"]) if network_kwargs else {}})
    backbones = sorted({m["backbone"] for m in models})
    config = {
        "format": FORMAT,
        "kind": KIND,
        "classes": classes,
        "backbone": backbones[0] if len(backbones) == 1 else ",".join(backbones),
        "preprocessing": preprocessing,
        "tta": tta,
        "temperature": float(temperature),
        "models": models,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return config


def load_ensemble(directory: str | Path) -> tuple[list[nn.Module], dict[str, Any]]:
    """The k networks and the ensemble.json description of an ensemble folder written by save_ensemble."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT or config.get("kind") != KIND:
        raise ValueError(f"{directory / CONFIG_FILE} is not a format-{FORMAT} {KIND} description")
    loaded = [load_model_file(directory / m["file"], m.get("network_kwargs")) for m in config["models"]]
    classes, _ = common_settings([meta for _, meta in loaded])
    if classes != config["classes"]:
        raise ValueError(f"{directory / CONFIG_FILE} lists classes {config['classes']}, its models {classes}")
    return [net for net, _ in loaded], config


class Predictor:
    """k networks behind one preprocessing: the mean of their softmax probabilities.

    `nets` are torch modules or any callables from a normalised float NCHW batch to logits (e.g. an onnxruntime
    session wrapped by src.serving.onnx_model). Probabilities are averaged in log space (logsumexp), so the
    ensemble's log-probabilities stay finite where a probability underflows; for one model without TTA they
    are exactly `log_softmax(logits / temperature)`.
    """

    def __init__(
        self,
        nets: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        classes: Sequence[str],
        preprocessing: dict[str, Any],
        *,
        tta: str = "none",
        temperature: float = 1.0,
        device: str | torch.device | None = None,
        channels_last: bool | None = None,
    ) -> None:
        check_options(tta, temperature)
        if not nets:
            raise ValueError("a predictor needs at least one network")
        self.classes, self.preprocessing = list(classes), dict(preprocessing)
        self.tta, self.temperature = tta, float(temperature)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Channels-last convolutions measured faster than the default layout on CPU (benchmarks/predict_bench.py).
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.nets = [self._prepare(net) for net in nets]
        self.preprocess = build_preprocess(self.preprocessing)

    def _prepare(self, net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        if not isinstance(net, nn.Module):
            return net
        if not isinstance(net, torch.fx.GraphModule):  # torch.export modules are frozen in eval mode
            net.eval()
        net.to(self.device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    @classmethod
    def from_dir(
        cls, directory: str | Path, *, tta: str | None = None, temperature: float | None = None, **kwargs: Any
    ) -> Predictor:
        """The ensemble saved in `directory` by save_ensemble; tta and temperature default to its own."""
        nets, config = load_ensemble(directory)
        return cls(
            nets,
            config["classes"],
            config["preprocessing"],
            tta=config["tta"] if tta is None else tta,
            temperature=config["temperature"] if temperature is None else temperature,
            **kwargs,
        )

    @torch.inference_mode()
    def log_probs(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, C) log of the ensemble's mean probabilities for a preprocessed (N, 3, H, W) batch, on the CPU."""
        x = batch.to(self.device, non_blocking=True)
        views = 2 if self.tta == "hflip" else 1
        if views == 2:
            x = torch.cat([x, x.flip(-1)])  # one forward pass for both views
        n = len(batch)
        per_view = [(net(x).float() / self.temperature).log_softmax(dim=1).reshape(views, n, -1) for net in self.nets]
        stacked = torch.cat(per_view)  # (k * views, N, C)
        return (torch.logsumexp(stacked, dim=0) - math.log(len(stacked))).cpu()

    def predict_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """(N, C) log-probabilities of decoded RGB images, `batch_size` at a time."""
        out = [
            self.log_probs(torch.stack([self.preprocess(image) for image in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def frame(self, log_probs: torch.Tensor) -> pd.DataFrame:
        """The pyfunc output: predicted class name, its probability, and prob_<class> for every class."""
        probs = log_probs.exp().numpy().astype(np.float64)
        best = probs.argmax(axis=1)
        columns = {"predicted": [self.classes[k] for k in best], "confidence": probs[np.arange(len(probs)), best]}
        columns.update({f"{PROB_PREFIX}{name}": probs[:, j] for j, name in enumerate(self.classes)})
        return pd.DataFrame(columns)


def _decode_row(row: pd.Series, index: Any) -> Image.Image:
    """The image of one input row: base64 `image` bytes, else a local image file named by `path`."""
    image, path = row.get("image"), row.get("path")
    if isinstance(image, str | bytes) and len(image) > 0:
        try:
            data = image if isinstance(image, bytes) else base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"row {index}: `image` is not base64 ({err})") from None
        try:
            return load_image(data)
        except Exception as err:  # Pillow raises many types for bad bytes
            raise ValueError(f"row {index}: `image` is not a readable image file ({type(err).__name__})") from None
    if isinstance(path, str) and path:
        file = Path(path)
        if file.suffix.lower() not in IMAGE_EXTENSIONS or not file.is_file():
            raise ValueError(f"row {index}: `path` {path} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        try:
            return load_image(file)
        except Exception as err:
            raise ValueError(f"row {index}: {path} is not a readable image ({type(err).__name__})") from None
    if isinstance(image, str | bytes):
        raise ValueError(f"row {index}: `image` is empty (a file of 0 bytes?); send the base64 of an image file")
    raise ValueError(f"row {index}: give `image` (base64 of the file's bytes) or `path`")


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc: DataFrame of images in, DataFrame of classes and probabilities out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.predictor = Predictor.from_dir(context.artifacts["ensemble"])

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if not {"image", "path"} & set(frame.columns):
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                "the input needs a column `image` (base64 of each image file) or `path`"
            )
        try:
            images = [_decode_row(row, index) for index, row in frame.iterrows()]
        except ValueError as err:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(str(err)) from None
        return self.predictor.frame(self.predictor.predict_images(images))


# Harmless on import from the repository: it only records the object that models-from-code loading looks up.
mlflow.models.set_model(EnsembleModel())
