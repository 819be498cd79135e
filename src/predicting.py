"""The run layer for predict.py, and the model loading that predict.py, test.py and export.py share.

Any model reference becomes one Predictor (src.serving): a model file (.pth, Lightning .ckpt), an ONNX file, a
saved ensemble folder, an MLflow model (`models:/<name>@<alias>`, `models:/<name>/<version>`,
`runs:/<id>/<path>`), or a configuration's fold ensemble (`runs:/<parent run id>`, logged under `ensemble`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.errors import UserError, positive_number

log = logging.getLogger(__name__)

MLFLOW_PREFIXES = ("models:/", "runs:/")
ENSEMBLE_ARTIFACT = "ensemble"  # where a configuration's parent run holds its fold ensemble
# runtime=auto on a CPU: exporting a ResNet18 to ONNX takes ~2.5-3 s on the 2-core benchmark machine, and onnxruntime
# then saves ~4 ms per 224 px image per network over torch channels-last (benchmarks/predict_bench.py), so the
# export pays for itself after about 600 images of 224 px; in pixels, since both scale with the image's area.
ONNX_PAYBACK_PIXELS = 600 * 224 * 224
REF_HINT = (
    "pass a models/*.pth file, a .ckpt, a model.onnx, models:/<name>@<alias>, models:/<name>/<version> "
    "or runs:/<parent run id>"
)


@dataclass
class LoadedModel:
    """Networks and everything a Predictor needs besides them, plus tags that link to where they came from."""

    nets: list[Any]
    classes: list[str]
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    origin: dict[str, str]
    tta: str = "none"
    temperature: float = 1.0
    is_onnx: bool = False


def _from_ensemble_dir(directory: Path, origin: dict[str, str]) -> LoadedModel:
    from src.serving.ensemble_model import load_ensemble

    try:
        nets, config = load_ensemble(directory)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise UserError(f"the ensemble in {directory} could not be loaded ({err}); log it again") from err
    meta = {"backbone": config["backbone"], "classes": config["classes"], **config["preprocessing"]}
    return LoadedModel(
        nets, config["classes"], config["preprocessing"], meta, origin, config["tta"], config["temperature"]
    )


def _from_single(net: Any, meta: dict[str, Any], origin: dict[str, str]) -> LoadedModel:
    from src.serving import preprocessing_from_meta

    return LoadedModel([net], list(meta["classes"]), preprocessing_from_meta(meta), meta, origin)


def _from_onnx(path: Path, origin: dict[str, str]) -> LoadedModel:
    from src.serving import preprocessing_from_meta
    from src.serving.onnx_model import read_onnx

    if not path.is_file():
        raise UserError(f"ckpt={path} does not exist; run export.py first, or {REF_HINT}")
    try:
        net, meta = read_onnx(path)
    except ImportError as err:
        raise UserError("running an ONNX file needs onnxruntime: pip install -r requirements.txt") from err
    except Exception as err:  # onnxruntime raises its own types for files it cannot parse
        raise UserError(f"ckpt={path} is not an ONNX file written by export.py ({err}); export it again") from err
    return LoadedModel([net], meta["classes"], preprocessing_from_meta(meta), meta, origin, is_onnx=True)


def _native(net: Any, meta: dict[str, Any]) -> Any:
    """A pt2 (torch.export) network logged by earlier versions of train.py, rebuilt as the plain torchvision
    module it was exported from (same state-dict layout), so that it runs channels-last or through onnxruntime
    like any model file."""
    import torch

    from src.model import native_network

    if not isinstance(net, torch.fx.GraphModule):
        return net
    try:
        return native_network(meta["backbone"], len(meta["classes"]), net.state_dict())
    except (RuntimeError, KeyError, ValueError):  # not a torchvision layout: run the exported graph as it is
        return net


def _from_mlflow(ref: str, cfg: DictConfig) -> LoadedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    from src import tracking
    from src.serving import ensemble_dir
    from src.tracking import registry
    from src.tracking.models import pt2_network

    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    database = tracking.store.sqlite_file(uri)
    if database is not None and not database.is_file():  # reading would create an empty store there
        raise UserError(
            f"ckpt={ref}: there is no MLflow store at {uri} ({database} does not exist); run from the folder you "
            f"trained in, or point logger.tracking_uri at the store that holds the model"
        )
    if ref.startswith("runs:/") and "/" not in ref.removeprefix("runs:/").strip("/"):
        ref = f"runs:/{ref.removeprefix('runs:/').strip('/')}/{ENSEMBLE_ARTIFACT}"
    if ref.endswith((".pth", ".ckpt")):  # a fold run's exported file
        net, meta, origin = tracking.load_logged_model(ref, uri)
        return _from_single(net, meta, origin)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        if ref.endswith(".onnx"):
            with tracking.store.downloaded(ref, uri) as local:  # the session holds the network once created
                return _from_onnx(local, {"training_run_id": ref.removeprefix("runs:/").split("/", 1)[0]})
        if ref.startswith("models:/"):
            origin = registry.model_origin(ref, uri)
        else:
            origin = {"training_run_id": ref.removeprefix("runs:/").split("/", 1)[0]}
        with tracking.store.downloaded(ref, uri) as local:  # the networks are in memory once loaded
            metadata = mlflow.models.Model.load(str(local)).metadata or {}
            if metadata.get("kind") != "cv_ensemble":  # a pt2 fold model logged by earlier versions of train.py
                net, meta = pt2_network(local, metadata, ref)
                return _from_single(_native(net, meta), meta, {**origin, "model_uri": ref})
            directory = ensemble_dir(local)
            if directory is None:
                raise UserError(f"ckpt={ref} is marked as an ensemble but holds no ensemble.json; log it again")
            return _from_ensemble_dir(directory, {**origin, "model_uri": ref})
    except MlflowException as err:
        hint = f"; a parent run holds its fold ensemble under `{ENSEMBLE_ARTIFACT}`" if ref.startswith("runs:/") else ""
        raise UserError(
            f"ckpt={ref} was not found in the MLflow store {uri}: {err.message.splitlines()[0]}{hint}"
        ) from err


def load_model(ref: str, cfg: DictConfig) -> LoadedModel:
    """Whatever `ref` names, as networks plus classes, preprocessing and origin tags."""
    if ref.startswith(MLFLOW_PREFIXES):
        return _from_mlflow(ref, cfg)
    from src.serving import ensemble_dir

    path = Path(ref)
    origin = {"model_file": str(path.resolve())}
    if path.is_dir():
        directory = ensemble_dir(path)
        if directory is None:
            raise UserError(f"ckpt={path} is a folder without ensemble.json; {REF_HINT}")
        return _from_ensemble_dir(directory, origin)
    if path.suffix.lower() == ".onnx":
        return _from_onnx(path, origin)
    from src.model import load_model_file

    net, meta = load_model_file(path)
    if meta.get("mlflow_run_id"):  # written by train.py with MLflow on
        origin["training_run_id"] = str(meta["mlflow_run_id"])
    return _from_single(net, meta, origin)


def resolve_runtime(runtime: str, model: LoadedModel, images: int | None = None, tta: str = "none") -> str:
    """`auto`: torch on a GPU; on a CPU, onnxruntime (measured fastest, benchmarks/predict_bench.py) when it is
    installed and `images` are enough to repay exporting the networks (None: assume they are), else torch."""
    import torch

    from src.serving.onnx_model import crop_hw, onnxruntime_available

    if runtime not in ("auto", "torch", "onnxruntime"):
        raise UserError(f"runtime={runtime} is not one of auto, torch, onnxruntime")
    if model.is_onnx:
        return "onnxruntime"
    if runtime == "auto":
        if torch.cuda.is_available() or not onnxruntime_available():
            return "torch"
        if images is not None:
            height, width = crop_hw(model.preprocessing)
            if images * (2 if tta == "hflip" else 1) * height * width < ONNX_PAYBACK_PIXELS:
                n = len(model.nets)
                log.info(
                    "runtime=auto: torch, since %d images at %dx%d px are too few to repay exporting %d network%s to "
                    "ONNX (runtime=onnxruntime exports them once)",
                    images, height, width, n, "s" * (n > 1),
                )  # fmt: skip
                return "torch"
        return "onnxruntime"
    if runtime == "onnxruntime" and not onnxruntime_available():
        raise UserError("runtime=onnxruntime needs onnxruntime, onnx and onnxscript: pip install -r requirements.txt")
    return runtime


def build_predictor(model: LoadedModel, cfg: DictConfig, images: int | None = None) -> Any:
    """The Predictor for a loaded model under the config's tta and runtime, for `images` images (None: unknown)."""
    from src.serving import Predictor
    from src.serving.ensemble_model import TTA_MODES

    tta = str(OmegaConf.select(cfg, "tta") or model.tta)
    if tta not in TTA_MODES:
        raise UserError(f"tta={tta} is not one of {', '.join(TTA_MODES)}")
    asked = str(OmegaConf.select(cfg, "runtime", default="torch"))
    runtime = resolve_runtime(asked, model, images, tta)
    nets = model.nets
    if runtime == "onnxruntime" and not model.is_onnx:
        from src.serving.onnx_model import onnx_nets

        try:
            nets = onnx_nets(nets, model.meta, cfg.onnx_cache_dir)
        except Exception as err:  # the exporter raises many types for graphs it cannot convert
            if asked == "onnxruntime":
                raise UserError(
                    f"could not export {cfg.ckpt} to ONNX ({type(err).__name__}); use runtime=torch"
                ) from err
            log.warning("runtime=auto: could not export to ONNX (%s: %s); running with torch", type(err).__name__, err)
            runtime = "torch"
    return Predictor(
        nets,
        model.classes,
        model.preprocessing,
        tta=tta,
        temperature=model.temperature,
        device="cpu" if runtime == "onnxruntime" else None,
    )


def load_predictor(cfg: DictConfig, images: int | None = None) -> tuple[Any, LoadedModel]:
    """The Predictor for `cfg.ckpt` to run on `images` images, and what was loaded (origin tags included)."""
    if OmegaConf.is_missing(cfg, "ckpt"):
        raise UserError(f"pass the model: ckpt=<model>; {REF_HINT}")
    model = load_model(str(cfg.ckpt), cfg)
    return build_predictor(model, cfg, images), model


def _skipped_warning(skipped: list[str], what: str) -> None:
    if skipped:
        shown = ", ".join(skipped[:20]) + (f" ... and {len(skipped) - 20} more" if len(skipped) > 20 else "")
        log.warning("skipped %d files in %s that are hidden, not images, or unreadable: %s", len(skipped), what, shown)


def _explain(model: LoadedModel, paths: list[Path], predicted: list[int], rows: list[dict], cfg: DictConfig) -> None:
    """Write a Grad-CAM overlay of the predicted class for the first `explain_max` images to `explain/`, and its
    file name into their rows (an ensemble shows the mean of its networks' maps)."""
    from PIL import Image

    from src.analysis.cam import explain

    if model.is_onnx:
        raise UserError("explain=true needs the PyTorch networks; pass the .pth or MLflow model, not the ONNX file")
    limit = int(cfg.explain_max)
    folder = Path(cfg.paths.output_dir) / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, min(limit, len(paths)), 16):
        chunk = range(start, min(start + 16, limit, len(paths)))
        pictures = explain(model.nets, model.preprocessing, [paths[i] for i in chunk], [predicted[i] for i in chunk])
        for i, picture in zip(chunk, pictures, strict=True):
            name = f"{i:04d}_{paths[i].stem}_{model.classes[predicted[i]]}.png"
            Image.fromarray((picture * 255).round().astype("uint8") if picture.dtype != "uint8" else picture).save(
                folder / name
            )
            rows[i]["explanation"] = f"explain/{name}"
    log.info("class-activation overlays of %d images in %s", min(limit, len(paths)), folder)


def predict(cfg: DictConfig) -> Path:
    """Predict every image that `cfg.input` names; write predictions.csv to the run folder and return its path."""
    from src.data import resolve_num_workers
    from src.evaluation import write_csv
    from src.serving.files import collect_images, predict_files

    if OmegaConf.is_missing(cfg, "input"):
        raise UserError("pass the images: input=<folder>, input=<image file> or input='<folder>/**/*.jpg'")
    top_k = int(cfg.top_k)
    if top_k < 1:
        raise UserError(f"top_k={top_k} must be at least 1")
    positive_number("batch_size", cfg.batch_size, integer=True)
    images, skipped = collect_images(str(cfg.input))
    if not images:
        found = f"holds only {len(skipped)} hidden or non-image files" if skipped else "matches no files"
        raise UserError(f"input={cfg.input} {found}; pass a folder of images, an image file or a glob")
    predictor, model = load_predictor(cfg, len(images))
    result = predict_files(predictor, images, int(cfg.batch_size), resolve_num_workers(cfg.num_workers))
    _skipped_warning([str(p) for p in skipped] + [str(images[i]) for i in result.failed], str(cfg.input))
    if not result.indices:
        raise UserError(f"none of the {len(images)} image files in input={cfg.input} could be decoded")
    probs = result.log_probs.exp()
    top_p, top_i = probs.topk(min(top_k, len(predictor.classes)), dim=1)
    rows = []
    for i, ps, ks in zip(result.indices, top_p.tolist(), top_i.tolist(), strict=True):
        row = {"path": str(images[i]), "predicted": predictor.classes[ks[0]], "confidence": round(ps[0], 6)}
        for rank, (p, k) in enumerate(zip(ps, ks, strict=True), 1):
            row[f"top{rank}"], row[f"top{rank}_prob"] = predictor.classes[k], round(p, 6)
        rows.append(row)
    if OmegaConf.select(cfg, "explain", default=False):
        _explain(model, [images[i] for i in result.indices], top_i[:, 0].tolist(), rows, cfg)
    out = write_csv(rows, Path(cfg.paths.output_dir) / "predictions.csv")
    n_models = len(predictor.nets)
    print(
        f"predicted {len(rows)} images with {cfg.ckpt} ({n_models} model{'s' * (n_models > 1)}, tta={predictor.tta})"
        f": {out}"
    )
    return out
