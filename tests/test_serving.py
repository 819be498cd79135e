"""Serving: the fold-ensemble MLflow model, predict.py, test.py on ensembles, ONNX export, and `mlflow models serve`.

Fold models here are random-init ResNet18s at 32 px saved as train.py saves them; their predictions mean nothing,
but every check compares two ways of computing the same numbers.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
import torchvision
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict
from PIL import Image

from src import data
from src.errors import UserError
from src.model import save_model_file
from src.serving import Predictor, log_ensemble_model
from src.serving import ensemble_model as served
from tests.conftest import CLASSES, ROOT, run_cli
from tests.helpers import serve

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ONE_LINE_ERROR = "error: "


def fold_file(path: Path, seed: int, **extra: object) -> Path:
    """A random-init ResNet18 saved like train.py's export (classes, backbone, image settings, fold)."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    meta = {"backbone": "resnet18", "classes": list(CLASSES), "image_size": 32, "mean": MEAN, "std": STD}
    meta |= {"freeze_backbone": True, "fold": seed, "best_val_accuracy": 0.5, **extra}
    return save_model_file(path, net.state_dict(), meta)


def reference_probs(files: list[Path], images: list[Path], hflip: bool = False, temperature: float = 1.0) -> np.ndarray:
    """The ensemble computed without src.serving: training's transform, plain torchvision, softmax, mean."""
    transform = data.build_transform(32, mean=MEAN, std=STD)
    x = torch.stack([transform(data.load_image(p)) for p in images])
    probs = []
    for file in files:
        saved = torch.load(file, weights_only=True)
        net = torchvision.models.resnet18(num_classes=len(CLASSES))
        net.load_state_dict(saved["state_dict"])
        net.eval()
        with torch.no_grad():
            probs += [torch.softmax(net(v) / temperature, dim=1) for v in ([x, x.flip(-1)] if hflip else [x])]
    return torch.stack(probs).mean(0).numpy()


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A bad-input failure is exit status 2 and exactly one line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(ONE_LINE_ERROR), result.stderr
    return lines[0]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def predict_cfg(*overrides: str) -> DictConfig:
    """conf/predict.yaml composed in-process, as predict.py would."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("predict", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    return cfg


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def folds(work: Path) -> list[Path]:
    return [fold_file(work / "models" / f"cnn_resnet18_freeze_backbone_True_fold_{k}.pth", k) for k in range(2)]


@pytest.fixture(scope="module")
def test_images(image_root: Path) -> list[Path]:
    return sorted((image_root / "test").rglob("*.png"))


@pytest.fixture(scope="module")
def store(work: Path, folds: list[Path]) -> Iterator[dict[str, str]]:
    """A sqlite store holding a parent run with the 2-fold ensemble (registered, alias champion) and a fold run with
    a pt2 model (as earlier versions of train.py logged folds; it must keep loading) and its exported file."""
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=str(work / "artifacts"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment, run_name="resnet18") as parent:
            info = log_ensemble_model(folds, name="ensemble")
        version = mlflow.register_model(info.model_uri, "resnet18_classifier").version
        client.set_registered_model_alias("resnet18_classifier", "champion", version)
        saved = torch.load(folds[0], weights_only=True)
        net = torchvision.models.resnet18(num_classes=len(CLASSES))
        net.load_state_dict(saved["state_dict"])
        example = torch.zeros(2, 3, 32, 32)
        with mlflow.start_run(experiment_id=experiment, run_name="fold=0") as fold_run:
            mlflow.log_artifact(str(folds[0]), "exported")
            mlflow.pytorch.log_model(
                net.eval(),
                name="model",
                serialization_format="pt2",
                input_example=example.numpy(),
                signature=mlflow.models.infer_signature(example.numpy(), net(example).detach().numpy()),
                metadata={k: saved[k] for k in ("backbone", "classes", "image_size", "mean", "std")},
            )
        yield {"uri": uri, "parent": parent.info.run_id, "fold": fold_run.info.run_id, "version": str(version)}
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_ensemble_is_the_mean_of_its_folds_probabilities(work: Path, folds: list[Path], test_images: list[Path]):
    ensemble = work / "ensemble-dir"
    config = served.save_ensemble(ensemble, folds)
    assert config["classes"] == list(CLASSES) and [m["fold"] for m in config["models"]] == [0, 1]
    images = [served.load_image(p) for p in test_images]
    for options, expected in (
        ({}, reference_probs(folds, test_images)),
        ({"tta": "hflip"}, reference_probs(folds, test_images, hflip=True)),
        ({"temperature": 2.0}, reference_probs(folds, test_images, temperature=2.0)),
    ):
        predictor = Predictor.from_dir(ensemble, **options)
        got = predictor.predict_images(images, batch_size=4).exp().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
    served.save_ensemble(work / "one", folds[:1])
    single = Predictor.from_dir(work / "one")
    np.testing.assert_allclose(
        single.predict_images(images).exp().numpy(), reference_probs(folds[:1], test_images), atol=1e-5
    )
    with pytest.raises(ValueError, match="classes"):
        served.save_ensemble(work / "bad", [folds[0], fold_file(work / "other.pth", 3, classes=["a", "b", "c"])])
    # A trainer that wrote the files passes their metadata instead of having them read back: the same description.
    metas = [{k: v for k, v in torch.load(f, weights_only=True).items() if k != "state_dict"} for f in folds]
    assert served.save_ensemble(work / "given", folds, metas=metas) == config
    with pytest.raises(ValueError, match="1 metadata entries for 2 model files"):
        served.save_ensemble(work / "short", folds, metas=metas[:1])


def test_serving_decodes_and_preprocesses_exactly_as_training(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)
    images = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (37, 53), dtype=np.uint8)])),
        "grey16.png": Image.fromarray(rng.integers(0, 65535, (37, 53), dtype=np.uint16)),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "grey.jpg": Image.fromarray(rgb[..., 0]),
    }
    transform = data.build_transform(32, mean=MEAN, std=STD)
    preprocess = served.build_preprocess(served.preprocessing_from_meta({"image_size": 32, "mean": MEAN, "std": STD}))
    for name, image in images.items():
        image.save(tmp_path / name)
        ours, theirs = served.load_image(tmp_path / name), data.load_image(tmp_path / name)
        assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(theirs)), name
        assert torch.equal(preprocess(ours), transform(theirs)), name
    custom = served.preprocessing_from_meta(
        {"image_size": 32, "resize_size": 40, "crop_size": 36, "interpolation": "bicubic", "mean": MEAN, "std": STD}
    )
    assert (custom["resize_size"], custom["crop_size"], custom["interpolation"]) == (40, 36, "bicubic")
    assert served.build_preprocess(custom)(served.load_image(tmp_path / "rgb.png")).shape == (3, 36, 36)


def test_logging_needs_an_active_run(folds: list[Path]) -> None:
    with pytest.raises(UserError, match="start_run"):
        log_ensemble_model(folds)


def test_the_logged_ensemble_loads_and_predicts_in_a_process_without_the_repository(
    store: dict[str, str], folds: list[Path], test_images: list[Path], tmp_path: Path
) -> None:
    script = """
import base64, json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = sys.argv[2:]
frame = pd.DataFrame({"image": [base64.b64encode(open(p, "rb").read()).decode() for p in images[:2]] + [None],
                      "path": [None, None, images[2]]})
out = model.predict(frame)
repo = [m for m in sys.modules if m == "src" or m.startswith(("src.", "tests"))]
print(json.dumps({"columns": list(out.columns), "rows": out.to_dict("records"), "repo_modules": repo,
                  "sys_path": sys.path, "metadata": model.metadata.metadata}))
"""
    # MLflow downloads the model into TMPDIR and leaves it there: the test's folder, not /tmp.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "MLFLOW_TRACKING_URI": store["uri"],
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, f"runs:/{store['parent']}/ensemble", *map(str, test_images[:3])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["repo_modules"] == [] and not any(Path(p) == ROOT for p in out["sys_path"] if p)
    assert out["columns"] == ["predicted", "confidence", *(f"prob_{c}" for c in CLASSES)]
    expected = reference_probs(folds, test_images[:3])
    got = np.array([[row[f"prob_{c}"] for c in CLASSES] for row in out["rows"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [row["predicted"] for row in out["rows"]] == [CLASSES[k] for k in expected.argmax(1)]
    assert out["metadata"]["kind"] == "cv_ensemble" and out["metadata"]["n_models"] == 2
    assert out["metadata"]["preprocessing"]["crop_size"] == 32
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{store['parent']}/ensemble", tracking_uri=store["uri"], dst_path=str(tmp_path / "downloaded")
    )
    requirements = (Path(local) / "requirements.txt").read_text()
    for package in ("mlflow==", "torch==", "torchvision==", "pillow==", "pandas==", "numpy=="):
        assert package in requirements


@contextlib.contextmanager
def model_server(model_uri: str, uri: str, cwd: Path) -> Iterator[str]:
    """The real `mlflow models serve` in this environment on a free port; its whole process group ends on exit."""
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts uvicorn by name
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    env["TMPDIR"] = str(cwd / "tmp")  # where MLflow downloads the model to serve, and leaves it
    command = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    (cwd / "tmp").mkdir(parents=True, exist_ok=True)
    with serve(command, "/ping", cwd / "serve.log", timeout=240, cwd=cwd, env=env) as url:
        yield url


def test_served_ensemble_answers_as_predict_py_does(store: dict[str, str], work: Path, test_images: list[Path]):
    image = test_images[4]
    with model_server(f"runs:/{store['parent']}/ensemble", store["uri"], work / "serve") as url:
        # predict.py on the same file while the server starts: the parent run's ensemble, by its run id
        result = run_cli(
            "predict.py",
            f"ckpt=runs:/{store['parent']}",
            f"input={image}",
            f"logger.tracking_uri={store['uri']}",
            f"onnx_cache_dir={work / 'onnx'}",
            f"hydra.run.dir={work / 'predict-parent'}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        (row,) = read_rows(work / "predict-parent" / "predictions.csv")
        expected = {row[f"top{r}"]: float(row[f"top{r}_prob"]) for r in (1, 2, 3)}
        encoded = base64.b64encode(image.read_bytes()).decode("ascii")
        for body in (
            {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}},
            {"dataframe_records": [{"image": encoded}]},
        ):
            response = requests.post(f"{url}/invocations", json=body, timeout=60)
            assert response.status_code == 200, response.text
            (answer,) = response.json()["predictions"]
            assert answer["predicted"] == row["predicted"]
            for name, p in expected.items():
                assert answer[f"prob_{name}"] == pytest.approx(p, abs=1e-5)
        bad = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "not base64!"}]}, timeout=60)
        assert bad.status_code == 400 and "base64" in bad.json()["message"]
        empty = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": ""}]}, timeout=60)
        assert empty.status_code == 400 and "`image` is empty" in empty.json()["message"]


def test_fold_models_logged_by_train_py_still_load(store: dict[str, str], folds: list[Path], test_images: list[Path]):
    from src.predicting import build_predictor, load_model

    cfg = predict_cfg(f"logger.tracking_uri={store['uri']}", "runtime=torch")
    expected = reference_probs(folds[:1], test_images)
    images = [served.load_image(p) for p in test_images]
    for ref in (f"runs:/{store['fold']}/model", f"runs:/{store['fold']}/exported/{folds[0].name}"):
        model = load_model(ref, cfg)
        assert model.origin["training_run_id"] == store["fold"]
        got = build_predictor(model, cfg).predict_images(images).exp().numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
    with pytest.raises(UserError, match="was not found"):
        load_model(f"runs:/{store['fold']}", cfg)  # a fold run has no ensemble


def test_test_py_scores_the_ensemble_with_its_log_probabilities(
    store: dict[str, str], work: Path, image_root: Path, folds: list[Path], test_images: list[Path]
) -> None:
    out = work / "test-champion"
    result = run_cli(
        "test.py",
        "ckpt=models:/resnet18_classifier@champion",
        f"data.test_dir={image_root / 'test'}",
        f"logger.tracking_uri={store['uri']}",
        "logger.experiment_name=serving",
        "runtime=onnxruntime",  # 9 small images alone would run torch (see the next test)
        f"onnx_cache_dir={work / 'onnx'}",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "test_metrics.json").read_text())
    probs = reference_probs(folds, test_images)
    targets = np.array([CLASSES.index(p.parent.name) for p in test_images])
    assert metrics["n_models"] == 2 and metrics["tta"] == "none"
    assert metrics["loss"] == pytest.approx(-np.log(probs[np.arange(len(targets)), targets]).mean(), abs=1e-4)
    assert metrics["accuracy"] == pytest.approx((probs.argmax(1) == targets).mean())
    client = MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name("serving")
    (test_run,) = client.search_runs([experiment.experiment_id], "tags.run_type = 'test'")
    tags = test_run.data.tags
    assert tags["training_run_id"] == store["parent"] and tags["model_version"] == store["version"]
    assert tags["model_name"] == "resnet18_classifier" and tags["model_uri"] == "models:/resnet18_classifier@champion"
    assert test_run.data.metrics["test_loss"] == pytest.approx(metrics["loss"])

    out = work / "test-parent-hflip"
    result = run_cli(
        "test.py",
        f"ckpt=runs:/{store['parent']}",
        "tta=hflip",
        "logger=none",
        f"data.test_dir={image_root / 'test'}",
        f"onnx_cache_dir={work / 'onnx'}",
        f"hydra.run.dir={out}",
        env={"MLFLOW_TRACKING_URI": store["uri"]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "test_metrics.json").read_text())
    probs = reference_probs(folds, test_images, hflip=True)
    assert metrics["tta"] == "hflip"
    assert metrics["loss"] == pytest.approx(-np.log(probs[np.arange(len(targets)), targets]).mean(), abs=1e-4)


def test_runtime_auto_exports_to_onnx_only_for_images_that_repay_it(folds: list[Path]) -> None:
    """A few images run torch at once; many, or mirrored ones counted twice, get onnxruntime; asking for a
    runtime gets it."""
    from src.predicting import ONNX_PAYBACK_PIXELS, load_model, resolve_runtime

    model = load_model(str(folds[0]), DictConfig({}))
    if torch.cuda.is_available():  # a GPU runs torch whatever the count
        assert resolve_runtime("auto", model, 10**9) == "torch"
        return
    area = model.preprocessing["crop_size"] ** 2
    enough = -(-ONNX_PAYBACK_PIXELS // area)  # images of this size that repay the export
    assert resolve_runtime("auto", model, 9) == "torch"
    assert resolve_runtime("auto", model, enough - 1) == "torch"
    assert resolve_runtime("auto", model, enough) == "onnxruntime"
    assert resolve_runtime("auto", model, -(-enough // 2), tta="hflip") == "onnxruntime"
    assert resolve_runtime("auto", model) == "onnxruntime"  # a count not known: as before
    assert resolve_runtime("onnxruntime", model, 1) == "onnxruntime" and resolve_runtime("torch", model) == "torch"


def test_predict_py_on_a_messy_folder_skips_bad_files_with_one_warning(
    work: Path, folds: list[Path], test_images: list[Path], tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    (photos / "trip" / "day 2").mkdir(parents=True)
    good = [photos / "a.png", photos / "trip" / "B.JPG", photos / "trip" / "day 2" / "c.jpeg"]
    for path, source in zip(good, test_images, strict=False):
        Image.open(source).convert("RGB").save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    bad = [photos / ".hidden.png", photos / "notes.txt", photos / "trip" / "broken.png"]
    bad[0].write_bytes(good[0].read_bytes())
    bad[1].write_text("not an image")
    bad[2].write_bytes(test_images[0].read_bytes()[:100])  # a truncated PNG
    common = [f"ckpt={folds[0]}", f"onnx_cache_dir={work / 'onnx'}", "top_k=2"]
    result = run_cli("predict.py", *common, f"input={photos}", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert [r["path"] for r in rows] == sorted(str(p) for p in good)
    assert list(rows[0]) == ["path", "predicted", "confidence", "top1", "top1_prob", "top2", "top2_prob"]
    by_path = {r["path"]: r for r in rows}
    expected = reference_probs(folds[:1], [good[0]])[0]
    assert by_path[str(good[0])]["predicted"] == CLASSES[expected.argmax()]
    assert float(by_path[str(good[0])]["confidence"]) == pytest.approx(expected.max(), abs=1e-5)
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and all(str(p) in warnings[0] for p in bad), output
    assert f"{tmp_path / 'out' / 'predictions.csv'}" in result.stdout
    # explain=true: a class-activation overlay for the first explain_max images, named in their rows
    out = tmp_path / "explained"
    result = run_cli("predict.py", *common, f"input={photos}", "explain=true", "explain_max=2", f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out / "predictions.csv")
    assert [bool(r["explanation"]) for r in rows] == [True, True, False]
    for row in rows[:2]:
        assert Image.open(out / row["explanation"]).size == (32, 32)

    (tmp_path / "empty").mkdir()
    line = error_line(run_cli("predict.py", *common, f"input={tmp_path / 'empty'}", f"hydra.run.dir={tmp_path}/e"))
    assert "input=" in line and "matches no files" in line
    line = error_line(run_cli("predict.py", *common, f"input={tmp_path}/nothing/*.png", f"hydra.run.dir={tmp_path}/g"))
    assert "matches no files" in line


def test_onnx_export_matches_pytorch_and_predicts_alike(
    work: Path, folds: list[Path], image_root: Path, tmp_path: Path
) -> None:
    import onnx

    result = run_cli(
        "export.py", f"ckpt={folds[1]}", f"data.test_dir={image_root / 'test'}", f"hydra.run.dir={tmp_path / 'e'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model_path = tmp_path / "e" / "model.onnx"
    assert "max abs probability difference" in result.stdout and f"model.onnx: {model_path}" in result.stdout
    props = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    assert json.loads(props["classes"]) == list(CLASSES) and props["backbone"] == "resnet18"
    assert json.loads(props["preprocessing"]) == {
        "resize_size": 32, "crop_size": 32, "interpolation": "bilinear", "mean": MEAN, "std": STD,
    }  # fmt: skip
    predicted = {}
    for name, ckpt, runtime in (("onnx", model_path, "auto"), ("torch", folds[1], "torch")):
        out = tmp_path / f"p-{name}"
        result = run_cli(
            "predict.py", f"ckpt={ckpt}", f"input={image_root / 'test'}", f"runtime={runtime}", f"hydra.run.dir={out}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        predicted[name] = {
            r["path"]: (r["predicted"], float(r["confidence"])) for r in read_rows(out / "predictions.csv")
        }
    assert len(predicted["onnx"]) == 9
    for path, (label, confidence) in predicted["torch"].items():
        assert predicted["onnx"][path][0] == label and predicted["onnx"][path][1] == pytest.approx(confidence, abs=1e-4)

    served.save_ensemble(tmp_path / "ensemble", folds)
    line = error_line(run_cli("export.py", f"ckpt={tmp_path / 'ensemble'}", f"hydra.run.dir={tmp_path / 'x'}"))
    assert "ensemble of 2 models" in line
