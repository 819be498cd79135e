"""Class-activation maps (Grad-CAM, pytorch-grad-cam) for any torchvision classifier.

The target layer is found by running the network once: the last module to finish whose output is a spatial
(N, C, H, W) map shaped like the image. That is the last convolutional stage of a CNN (resnet's layer4, the
`features` of mobilenet, efficientnet or convnext) and the last stage of swin and maxvit. A vision transformer's
only such map is its patch embedding, where a CAM says nothing about the decision, so a map that most of the
network runs after is not taken and the caller shows the plain image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

log = logging.getLogger(__name__)

# The target map must come after at least this share of the layers that run (not the patch embedding).
MIN_DEPTH = 0.5
CHUNK = 8  # images per backward pass: a 224 px resnet50 keeps about 100 MB of activations per image


def _is_image_map(output: object, height: int, width: int) -> bool:
    """A 4-D tensor whose last two dimensions are a downscaled image (not NHWC, not pooled to 1x1)."""
    if not isinstance(output, torch.Tensor) or output.ndim != 4:
        return False
    h, w = output.shape[-2:]
    return h > 1 and w > 1 and abs(h * width - w * height) <= height + width


@torch.no_grad()
def target_layer(net: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The module whose output Grad-CAM should weigh for `net` on inputs shaped like `example`, or None."""
    finished: list[tuple[nn.Module, bool, bool]] = []  # (module, is a leaf, outputs an image map)
    height, width = example.shape[-2:]

    def record(module: nn.Module, _: object, output: object) -> None:
        finished.append((module, next(module.children(), None) is None, _is_image_map(output, height, width)))

    hooks = [m.register_forward_hook(record) for m in net.modules() if m is not net]
    try:
        net.eval()(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    calls: dict[nn.Module, int] = {}
    for module, _, _ in finished:
        calls[module] = calls.get(module, 0) + 1
    leaves = np.cumsum([leaf for _, leaf, _ in finished])
    for i in range(len(finished) - 1, -1, -1):
        module, _, is_map = finished[i]
        if is_map and calls[module] == 1:  # a module that runs twice would give Grad-CAM two activations
            return module if leaves[i] >= MIN_DEPTH * leaves[-1] else None
    return None


def _gradients_start_here(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    """The target map as the start of the autograd graph. Grad-CAM needs only d(score)/d(map): with every
    parameter frozen, nothing before the map is recorded or back-propagated (a fraction of the full backward
    pass), and the maps are the same. A copy, not the leaf itself, so a network that applies an in-place op
    to the map (densenet's final ReLU) still runs."""
    return output.detach().requires_grad_(True).clone()


def class_activation_maps(net: nn.Module, batch: torch.Tensor, classes: Sequence[int]) -> np.ndarray | None:
    """(N, H, W) Grad-CAM maps in [0, 1] at the input's size, each for the class given for its image; None
    where the network has no suitable layer (see `target_layer`)."""
    layer = target_layer(net, batch)
    if layer is None:
        return None
    targets = [ClassifierOutputTarget(int(k)) for k in classes]
    trainable = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    start = layer.register_forward_hook(_gradients_start_here)  # before GradCAM's hooks, which read its output
    try:
        with GradCAM(model=net, target_layers=[layer]) as cam:
            maps = [
                cam(input_tensor=batch[i : i + CHUNK], targets=targets[i : i + CHUNK])
                for i in range(0, len(batch), CHUNK)
            ]
    except RuntimeError as err:  # an exotic network must not cost the rest of the report
        log.warning("no class-activation maps for %s: %s", type(net).__name__, err)
        return None
    finally:
        start.remove()
        for param, flag in zip(net.parameters(), trainable, strict=True):
            param.requires_grad_(flag)
    return np.nan_to_num(np.concatenate(maps).astype(np.float32))


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """An RGB float image in [0, 1] with the map drawn over it as a jet heat map (uint8 RGB)."""
    return show_cam_on_image(image.astype(np.float32), cam, use_rgb=True, image_weight=image_weight)


def explain(
    nets: Sequence[nn.Module], preprocessing: dict, paths: Sequence[Path], classes: Sequence[int]
) -> list[np.ndarray]:
    """The images as the networks see them (resized, centre-cropped), each with the Grad-CAM of its class in
    `classes` drawn over it: for an ensemble the mean of its networks' maps. Plain images where no network has a
    convolutional map."""
    from src.serving.ensemble_model import build_preprocess, load_image

    preprocess = build_preprocess(preprocessing)
    batch = torch.stack([preprocess(load_image(p)) for p in paths])
    mean = torch.tensor(preprocessing["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(3, 1, 1)
    pictures = (batch * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    maps = [m for m in (class_activation_maps(net, batch, classes) for net in nets) if m is not None]
    if not maps:
        return list(pictures)
    mean_map = np.mean(maps, axis=0)
    return [overlay(picture, cam) for picture, cam in zip(pictures, mean_map, strict=True)]
