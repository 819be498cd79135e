"""Model: torchvision backbones with a new head, freezing, and the Lightning module that trains them.

The network is kept as two modules, `backbone` (image -> flat feature vector) and `head`
(feature vector -> logits), so that freezing, feature caching and export all work on
the same split, for every torchvision classification family. Saved files hold torchvision's
own state-dict layout, loadable into `torchvision.models.get_model(backbone,
num_classes=len(classes), **native_kwargs(backbone))` with no code of ours (the kwargs are
empty except for googlenet and inception_v3).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from src import files
from src.errors import UserError
from src.preprocessing import IMAGENET_MEAN, IMAGENET_STD, is_weights_file

log = logging.getLogger(__name__)

HEAD_ATTRS = ("fc", "classifier", "heads", "head")
MODEL_FILE_FORMAT = 1
# torchvision builds these pretrained without their auxiliary classifiers (they only feed an extra training
# loss) and with `transform_input`, which re-normalises ImageNet-normalised input the way those weights were
# trained. Random init gets the same form, so that every model file of a backbone has one layout.
AUX_CLASSIFIERS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
# A frozen backbone's checkpoints hold the head alone plus this reference to the backbone (see ImageClassifier).
FROZEN_BACKBONE_KEY = "frozen_backbone"


def digest_module(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of every parameter and buffer."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def native_kwargs(name: str) -> dict[str, Any]:
    """Extra `torchvision.models.get_model` arguments that build network `name` to load one of our state dicts
    into (empty for most); `init_weights=False` skips an initialisation the loaded tensors replace anyway."""
    return {"aux_logits": False, "transform_input": True, "init_weights": False} if name in AUX_CLASSIFIERS else {}


def _head_attr(net: nn.Module) -> str:
    for attr in HEAD_ATTRS:
        if isinstance(getattr(net, attr, None), nn.Module):
            return attr
    raise UserError(f"{type(net).__name__} has no fc/classifier/head layer to replace; pick another backbone")


def _output_layer(head: nn.Module, name: str) -> str:
    """Path (inside the head) of the layer that produces the logits: the last Linear or Conv2d."""
    layers = [path for path, module in head.named_modules() if isinstance(module, nn.Linear | nn.Conv2d)]
    if not layers:
        raise UserError(f"backbone {name!r} is not supported: its head has no Linear or Conv2d output layer")
    return layers[-1]


class _SquareMaps(nn.Module):
    """(N, C*S*S) -> (N, C, S, S): a convolutional head (squeezenet) gets back the maps its backbone flattened.

    Images are square after the centre crop, so S follows from the feature length.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = math.isqrt(x.shape[1] // self.channels)
        return x.unflatten(1, (self.channels, side, side))


def _split_head(net: nn.Module, attr: str, num_classes: int, name: str) -> nn.Module:
    """Cut `net.<attr>` so that `net` ends in a flat feature vector; return the head with a new output layer.

    Layers of the head up to its last Flatten (convnext's LayerNorm2d, maxvit's pooling) stay in the
    backbone; the rest, e.g. mobilenet's or vgg's MLP, is the trainable head. Either side keeps the others'
    places as Identity, so `attr.<name>` is still the torchvision key of every head tensor.
    """
    old = getattr(net, attr)
    children = list(old.named_children()) if isinstance(old, nn.Sequential) else []
    cut = max((i + 1 for i, (_, m) in enumerate(children) if isinstance(m, nn.Flatten)), default=0)
    if cut:
        blank = [(n, nn.Identity()) for n, _ in children]
        setattr(net, attr, nn.Sequential(OrderedDict(children[:cut] + blank[cut:])))
        head = nn.Sequential(OrderedDict(blank[:cut] + children[cut:]))
    else:
        setattr(net, attr, nn.Identity())
        head = old
    path = _output_layer(head, name)
    layer = head.get_submodule(path)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
    else:
        new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride, layer.padding)
    if not path:  # the head is a single Linear (resnet's fc, swin's head)
        return new
    parent, _, child = path.rpartition(".")
    setattr(head.get_submodule(parent), child, new)
    if isinstance(new, nn.Conv2d):  # squeezenet: its forward flattens the maps after the classifier
        first = next(m for m in head.modules() if isinstance(m, nn.Conv2d))
        head = nn.Sequential(
            OrderedDict([("maps", _SquareMaps(first.in_channels)), *head.named_children(), ("flatten", nn.Flatten())])
        )
    return head


def _weights_hint(name: str, weights: str) -> str:
    try:
        url = torchvision.models.get_model_weights(name)[weights].url
        target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        return f"download {url} to {target}, or pass model.weights=/path/to/weights.pth, or model.weights=null"
    except Exception:  # the hint must never hide the original error
        return "pass model.weights=/path/to/weights.pth or model.weights=null"


def _load_local_weights(net: nn.Module, path: Path, output_key: str) -> None:
    """Load every tensor but the output layer's from a torchvision-layout state dict (or one of our model files).

    Tensors of modules our network leaves out (the auxiliary classifiers of googlenet/inception) are ignored.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"model.weights={path} could not be read as a PyTorch state dict ({err}); check the file"
        ) from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"model.weights={path} holds no state dict; save one with torch.save(model.state_dict(), path)")
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(output_key) and getattr(net, k.partition(".")[0], nn.Identity()) is not None
    }
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(output_key)]
    if missing or result.unexpected_keys:
        raise UserError(
            f"model.weights={path} does not fit this backbone (missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); use weights saved from the same architecture"
        )


_last_built: tuple[tuple[Any, ...], nn.Module, torch.Tensor] | None = None
_built_digest: dict[tuple[Any, ...], str] = {}  # the backbone digest of `_last_built`, once a job has computed it


def _torchvision_net(name: str, weights: str | None) -> nn.Module:
    """`_build_torchvision_net`, remembering the last network built: the jobs of a sweep build the same one,
    which costs a random initialisation or a weights file read (0.1-0.5 s) each time. A copy comes back when the
    name, the weights (a file by size and time) and the CPU RNG state match, and the RNG is moved on exactly as
    the build would have moved it, so what follows draws the same numbers either way."""
    global _last_built
    stamp = None
    if is_weights_file(weights) and Path(weights).is_file():
        stat = Path(weights).stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    rng = torch.get_rng_state()
    key = (name, weights, stamp, hashlib.sha256(rng.numpy().tobytes()).hexdigest())
    if _last_built is not None and _last_built[0] == key:
        torch.set_rng_state(_last_built[2])
        net = copy.deepcopy(_last_built[1])
    else:
        net = _build_torchvision_net(name, weights)
        _last_built = (key, copy.deepcopy(net), torch.get_rng_state())
        _built_digest.clear()
    net._built_as = key  # until its weights change: see backbone_digest
    return net


def _digest_as_built(backbone: nn.Module) -> str:
    """`digest_module(backbone)`, computed once per network `_torchvision_net` builds: every frozen backbone a
    sweep's jobs build from it is a copy with the same weights (hashing ResNet18's 45 MB: ~35 ms per job)."""
    key = backbone.__dict__.get("_built_as")
    if key is not None and key in _built_digest:
        return _built_digest[key]
    digest = digest_module(backbone)
    if key is not None and _last_built is not None and _last_built[0] == key:
        _built_digest[key] = digest
    return digest


def _build_torchvision_net(name: str, weights: str | None) -> nn.Module:
    """torchvision model `name` with 1000 classes: pretrained, loaded from a local file, or randomly initialised."""
    local = is_weights_file(weights)
    if weights is None or local:
        kwargs = native_kwargs(name) | ({"init_weights": True} if name in AUX_CLASSIFIERS else {})
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        if local:
            if not Path(weights).is_file():
                raise UserError(f"model.weights={weights} is not a file; give the path to a saved state dict")
            attr = _head_attr(net)
            _load_local_weights(net, Path(weights), f"{attr}.{_output_layer(getattr(net, attr), name)}.")
        return net
    available = [w.name for w in torchvision.models.get_model_weights(name)]
    if weights not in available:
        raise UserError(f"model.weights={weights} is not a {name} weight set; use one of {available}, a file, or null")
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except Exception as err:  # URLError, socket timeouts, HTTP errors, truncated downloads
        raise UserError(f"could not download {name} {weights} weights ({err}); {_weights_hint(name, weights)}") from err
    if name in AUX_CLASSIFIERS:  # googlenet's builder drops them itself, inception_v3's keeps them
        net.aux_logits = False
        for aux in AUX_CLASSIFIERS[name]:
            setattr(net, aux, None)
    return net


def build_network(name: str, num_classes: int, weights: str | None) -> tuple[nn.Module, nn.Module, str]:
    """torchvision model `name` split into (backbone, new head, head attribute name).

    The backbone maps images (N, 3, H, W) to flat features (N, D), the head features to logits: the split
    that freezing and the feature cache need. `weights` is a torchvision weights enum name (e.g.
    IMAGENET1K_V1, fetched into the torch hub cache), a path to a local state-dict file, or None for
    random init.
    """
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(
            f"unknown backbone {name!r}; use model=resnet18|resnet50|mobilenet_v3_small|efficientnet_b0 "
            f"or model.name=<a torchvision classification model>"
        )
    net = _torchvision_net(name, weights)
    attr = _head_attr(net)
    head = _split_head(net, attr, num_classes, name)
    return net, head, attr


def native_state_dict(backbone: nn.Module, head: nn.Module, head_attr: str) -> dict[str, torch.Tensor]:
    """The state dict in torchvision's own layout (`layer1...`, `fc.weight`).

    It keeps the per-module `_metadata` of `Module.state_dict()`: mnasnet refuses to load without its version.
    """
    backbone_state, head_state = backbone.state_dict(), head.state_dict()
    state = OrderedDict((k, v.detach().cpu()) for k, v in backbone_state.items())
    state.update((f"{head_attr}.{k}", v.detach().cpu()) for k, v in head_state.items())
    state._metadata = {
        **backbone_state._metadata,
        **{f"{head_attr}.{k}".rstrip("."): v for k, v in head_state._metadata.items()},
    }
    return state


def native_network(name: str, num_classes: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain torchvision model (eval mode) holding `state`, the form we export and log to MLflow."""
    from src.serving.ensemble_model import torchvision_network

    return torchvision_network(name, state, {"num_classes": num_classes, **native_kwargs(name)})


def save_model_file(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write state dict + metadata (classes, backbone, image settings); loads with weights_only=True.

    Without the zip records' CRC32 (a third of the write: ~30 ms for ResNet18, every fold): torch.load never
    checks it, so only a zip tool's integrity test (`unzip -t`) would report the missing checksums.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.temporary_name(path)
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"format": MODEL_FILE_FORMAT, "state_dict": state, **meta}, tmp)
        files.replace(tmp, path)  # never leave a half-written model where a good one was
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        torch.serialization.set_crc32_options(crc)
    return path


class ImageClassifier(L.LightningModule):
    """A backbone + head classifier; `freeze_backbone` trains the head alone.

    Inputs may be images (N, 3, H, W) or precomputed backbone features (N, D): the
    latter skip the backbone, which is how the frozen-backbone feature cache trains.
    """

    def __init__(
        self,
        backbone: str,
        classes: list[str],
        image_size: int,
        freeze_backbone: bool = True,
        weights: str | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        backbone_lr_mult: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # Random init is rebuilt from this RNG state when a head-only checkpoint is loaded elsewhere.
        self._init_rng_state = torch.get_rng_state() if weights is None else None
        self.backbone, self.head, self.head_attr = build_network(backbone, len(classes), weights)
        self.freeze_backbone = freeze_backbone
        self._backbone_sha256: str | None = None
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        # Takes hard (N,) or soft (N, C) targets (MixUp/CutMix); the weights live in the state dict as a buffer.
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.backbone_lr_mult = backbone_lr_mult
        n = len(classes)
        metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
                "balanced_accuracy": MulticlassAccuracy(n, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")
        self.losses = nn.ModuleDict({f"{s}_loss": MeanMetric() for s in ("train", "val")})  # weighted by batch size
        self._unlogged: set[str] = set()

    def backbone_digest(self) -> str:
        """The frozen backbone's digest, computed once (~35 ms for ResNet18): its weights never change. One that
        trains is hashed every time, and is no longer the network it was built as."""
        if not self.freeze_backbone:
            self.backbone.__dict__.pop("_built_as", None)
            self._backbone_sha256 = digest_module(self.backbone)
        elif self._backbone_sha256 is None:
            self._backbone_sha256 = _digest_as_built(self.backbone)
        return self._backbone_sha256

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen backbone is left out: the checkpoint holds the head (and optimizer) plus the backbone's
        digest and how to rebuild it, kilobytes instead of the whole network on every save. Only a backbone frozen
        for the whole run (`hparams.freeze_backbone`) is: gradual fine-tuning's head epochs freeze it for a while,
        and their checkpoints must still hold it, since the backbone trains afterwards."""
        if not self.hparams.freeze_backbone:
            return
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint[FROZEN_BACKBONE_KEY] = {"sha256": self.backbone_digest(), "init_rng_state": self._init_rng_state}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put this module's own backbone into a head-only checkpoint, once its digest shows it is the one
        the head was trained on."""
        ref = checkpoint.get(FROZEN_BACKBONE_KEY)
        if ref is None:
            self._backbone_sha256 = None  # a whole-network checkpoint may bring other backbone weights
            self.backbone.__dict__.pop("_built_as", None)
            return
        if ref["sha256"] != self.backbone_digest():
            raise UserError(
                f"the checkpoint's head was trained on another frozen {self.hparams.backbone} backbone "
                f"(sha256 {ref['sha256'][:12]}, this one {self.backbone_digest()[:12]}); use the same model.weights "
                f"it was trained with, or start the fold afresh with resume=false"
            )
        checkpoint["state_dict"].update((f"backbone.{k}", v) for k, v in self.backbone.state_dict().items())

    def load_checkpoint_weights(self, checkpoint: dict[str, Any]) -> None:
        """Load a checkpoint's weights, whole-network or head-only, outside a Trainer."""
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def train(self, mode: bool = True) -> ImageClassifier:
        """Keep a frozen backbone in eval mode: Lightning calls train() every epoch, and
        BatchNorm would otherwise keep updating its running statistics."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) go through backbone and head; cached features (N, D) through the head alone.

        uint8 images (from the decoded-image store, src/decoded.py) are scaled and normalised here, on the
        model's device, with the same operations the CPU transform would have run on each image.
        """
        if x.dtype == torch.uint8:
            from torchvision.transforms.v2 import functional as F

            x = F.normalize(F.to_dtype(x, torch.float32, scale=True), list(self.hparams.mean), list(self.hparams.std))
        if x.ndim == 4:
            x = self.backbone(x)
        elif x.ndim != 2:
            raise ValueError(f"expected images (N, C, H, W) or features (N, D), got a tensor of shape {tuple(x.shape)}")
        return self.head(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        metrics.update(logits, y.argmax(dim=1) if y.ndim == 2 else y)  # soft targets count as their top class
        self.losses[f"{stage}_loss"].update(loss.detach(), len(y))
        if stage in self._unlogged:
            # Metric objects are logged once per epoch: Lightning computes (and syncs across devices) and resets them
            # at the epoch's end, while a self.log per step cost milliseconds of bookkeeping each.
            self._unlogged.discard(stage)
            self.log(f"{stage}_loss", self.losses[f"{stage}_loss"], on_step=False, on_epoch=True)
            self.log_dict(metrics, on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._unlogged.add("val")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        # A logged "step" makes Lightning's loggers use the epoch as the x-axis, not the batch count.
        self.log("step", float(self.current_epoch))

    def on_train_epoch_start(self) -> None:
        self._unlogged.add("train")
        # Read here: Lightning steps epoch-interval schedulers before on_train_epoch_end.
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self) -> None:
        self.log("step", float(self.current_epoch))

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda p: torch.optim.Adam(p, lr=1e-3))
        if self.backbone_lr_mult is None:
            optimizer = factory([p for p in self.parameters() if p.requires_grad])
        else:
            # Two groups from the start, head first: a scheduler made now must already see the group of a backbone
            # that is unfrozen later (src/finetune.py). Frozen parameters get no gradient, so no step moves them.
            optimizer = factory(
                [{"params": list(self.head.parameters())}, {"params": list(self.backbone.parameters())}]
            )
            optimizer.param_groups[1]["lr"] *= self.backbone_lr_mult
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }

    def model_meta(self) -> dict[str, Any]:
        """What test.py needs besides the weights: classes, backbone and the evaluation preprocessing
        (resize, crop = image_size, interpolation, mean/std; checkpoints from before resize_size resize to the crop)."""
        hp = self.hparams
        return {
            "backbone": hp.backbone,
            "classes": list(hp.classes),
            "image_size": int(hp.image_size),
            "resize_size": int(hp.get("resize_size") or hp.image_size),
            "crop_size": int(hp.image_size),
            "interpolation": str(hp.get("interpolation") or "bilinear"),
            "mean": [float(m) for m in hp.mean],
            "std": [float(s) for s in hp.std],
            "freeze_backbone": bool(hp.freeze_backbone),
        }

    def native_state_dict(self) -> dict[str, torch.Tensor]:
        return native_state_dict(self.backbone, self.head, self.head_attr)


class ChannelsLast(L.Callback):
    """Store the convolution weights channels-last (NHWC), the layout tensor cores read without transposes
    under mixed precision (`trainer=gpu`).

    Converting the module is enough: cuDNN (and oneDNN on CPU) runs a convolution channels-last when its
    weight is, so image batches switch layout in the first layer, and cached (N, D) features are untouched.
    Checkpoints and exported files stay loadable either way: `load_state_dict` copies into any layout.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


def _module_for_checkpoint(saved: dict[str, Any]) -> ImageClassifier:
    """An ImageClassifier to load a Lightning checkpoint into; for a head-only one, with its frozen backbone
    rebuilt the way training built it (the same weights file or enum, or the same random init)."""
    hp, ref = saved["hyper_parameters"], saved.get(FROZEN_BACKBONE_KEY)
    if ref is None:
        return ImageClassifier(**{**hp, "weights": None})
    with torch.random.fork_rng(devices=[]):
        if ref.get("init_rng_state") is not None:
            torch.set_rng_state(ref["init_rng_state"])
        try:
            return ImageClassifier(**hp)
        except UserError as err:
            raise UserError(f"this checkpoint holds the head alone and its backbone cannot be rebuilt: {err}") from err


def load_model_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained network (eval mode) and its metadata from an exported `.pth` or a Lightning `.ckpt`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"ckpt={path} does not exist; pass an exported models/*.pth, a Lightning .ckpt or a models:/ URI"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"ckpt={path} is not a readable PyTorch file ({type(err).__name__}); re-export or pick another checkpoint"
        ) from err
    if isinstance(saved, dict) and "hyper_parameters" in saved and "state_dict" in saved:
        module = _module_for_checkpoint(saved)
        module.load_checkpoint_weights(saved)
        meta = module.model_meta()
        return native_network(meta["backbone"], len(meta["classes"]), module.native_state_dict()), meta
    if isinstance(saved, dict) and {"state_dict", "classes", "backbone", "image_size"} <= saved.keys():
        meta = {k: v for k, v in saved.items() if k != "state_dict"}
        return native_network(meta["backbone"], len(meta["classes"]), saved["state_dict"]), meta
    raise UserError(
        f"ckpt={path} holds no classes and backbone; pass a file written by train.py (models/*.pth or a .ckpt)"
    )
