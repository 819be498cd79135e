"""ONNX: export one network with its classes and preprocessing in the file, and run ONNX files with onnxruntime.

The graph takes a normalised float32 NCHW batch (dynamic batch size, fixed crop size) named `image` and returns
logits named `logits`, not probabilities: softmax, a fitted temperature and ensembling stay outside the graph,
in the Predictor, exactly as for PyTorch networks. The file's metadata_props hold `classes` (JSON list),
`backbone`, `preprocessing` (JSON: resize_size, crop_size, interpolation, mean, std), `input` and `output`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.serving.ensemble_model import Predictor, preprocessing_from_meta

INPUT, OUTPUT = "image", "logits"
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "onnx_ir", "onnxscript")
INPUT_DOC = "float32 NCHW, RGB scaled to [0, 1] then normalised with mean/std, H x W = crop_size; batch is dynamic"


def crop_hw(preprocessing: dict[str, Any]) -> tuple[int, int]:
    crop = preprocessing["crop_size"]
    return (int(crop), int(crop)) if isinstance(crop, int | float) else (int(crop[0]), int(crop[-1]))


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise loggers to WARNING for a while: the exporter reports every optimisation pass at INFO, which Hydra's
    root handler would print."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(net: nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """Write `net` as ONNX (torch.onnx.export with the dynamo exporter, weights inside the one file)."""
    preprocessing = preprocessing_from_meta(meta)
    example = torch.zeros(2, 3, *crop_hw(preprocessing))
    net = net.cpu()
    if not isinstance(net, torch.fx.GraphModule):
        net.eval()
    with _quiet(*EXPORTER_LOGGERS):
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.model.metadata_props.update(
        {
            "classes": json.dumps(list(meta["classes"])),
            "backbone": str(meta.get("backbone", "")),
            "preprocessing": json.dumps(preprocessing),
            "input": INPUT_DOC,
            "output": "logits (N, classes); apply softmax for probabilities",
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    program.save(tmp, external_data=False)
    tmp.replace(path)  # never leave a half-written file where another process may read it
    return path


class OnnxNet:
    """An onnxruntime session as a callable from a float NCHW tensor to logits, so the Predictor runs it like a
    torch network. `metadata` is the file's metadata_props."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])


def read_onnx(path: str | Path) -> tuple[OnnxNet, dict[str, Any]]:
    """The runtime network and its metadata (classes, backbone, preprocessing) from a file export_onnx wrote."""
    net = OnnxNet(path)
    if not {"classes", "preprocessing"} <= net.metadata.keys():
        raise ValueError(f"{path} has no classes and preprocessing in its metadata; export it with export.py")
    meta = {
        "classes": json.loads(net.metadata["classes"]),
        "backbone": net.metadata.get("backbone", ""),
        **json.loads(net.metadata["preprocessing"]),
    }
    return net, meta


def onnxruntime_available() -> bool:
    """onnxruntime to run, onnx and onnxscript to export (the dynamo exporter needs both)."""
    from importlib.util import find_spec

    return all(find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def _digest(net: nn.Module, meta: dict[str, Any]) -> str:
    """Weights, architecture, input size and exporter versions: what the exported graph depends on."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    versions = [version(p) for p in ("torch", "onnx", "onnxscript")]
    h.update(json.dumps([type(net).__name__, preprocessing_from_meta(meta), versions], default=str).encode())
    return h.hexdigest()[:32]


def onnx_nets(nets: Sequence[nn.Module], meta: dict[str, Any], cache_dir: str | Path) -> list[OnnxNet]:
    """onnxruntime versions of torch networks, exported once and kept in `cache_dir` by a digest of their weights,
    architecture, input size and the exporter's versions, so later runs skip the export."""
    out = []
    for net in nets:
        path = Path(cache_dir) / f"{_digest(net, meta)}.onnx"
        if not path.is_file():
            export_onnx(net, meta, path)
        out.append(OnnxNet(path))
    return out


def parity(reference: Predictor, candidate: Predictor, batch: torch.Tensor) -> tuple[float, int]:
    """(max absolute difference of probabilities, number of images whose argmax differs) on a preprocessed batch."""
    p, q = reference.log_probs(batch).exp(), candidate.log_probs(batch).exp()
    return float((p - q).abs().max()), int((p.argmax(1) != q.argmax(1)).sum())
