"""Error analysis (src.analysis): label issues, calibration, Grad-CAM target layers, the report and its CLI.

The images are real PNG files tinted by class (as conftest.write_images); the fold models are random-init
torchvision networks saved as train.py saves them, and the CLI reads real sweep folders and a real MLflow store.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from scipy.special import softmax
from sklearn.model_selection import StratifiedKFold

from src.analysis import (
    apply_temperature,
    expected_calibration_error,
    find_label_issues,
    fit_temperature,
    read_oof,
    write_report,
)
from src.analysis.__main__ import main
from src.analysis.cam import class_activation_maps, target_layer
from src.analysis.gallery import fit_square
from src.analysis.label_issues import write_label_issues
from src.errors import UserError
from src.model import save_model_file
from src.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import ROOT

# Sorted, as ImageFolder sorts them; with a space, an underscore, HTML characters and a long name.
CLASSES = ["blue jay <b>", "red_fox", "snow leopard of the high mountain ranges of central asia"]
FLIPPED = 4  # images per data set whose label is changed to the next class
N_FOLDS = 3


def write_tinted(root: Path, per_class: int = 15, size: int = 32, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Class k is noise tinted by channel k with a strength that varies per image, so some are ambiguous."""
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            pixels[..., k] += np.uint8(150 if i < 5 else rng.integers(35, 150))
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
            paths.append(f"{name}/{i:03d}.png")
            labels.append(k)
    return paths, np.array(labels)


def colour_probs(root: Path, paths: list[str]) -> np.ndarray:
    """What a good model would say from each image's colour: softmax of its channel means / 30."""
    means = np.array([np.asarray(Image.open(root / p), dtype=np.float64).reshape(-1, 3).mean(axis=0) for p in paths])
    return softmax(means / 30.0, axis=1)


def flip_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels with the first FLIPPED strongly tinted images of the first class moved to the next class."""
    flipped = np.arange(FLIPPED)  # images 000-003 of class 0, tinted at full strength
    given = labels.copy()
    given[flipped] = (labels[flipped] + 1) % len(CLASSES)
    return given, flipped


def oof_rows(paths: list[str], given: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Predictions in the layout of val_predictions.csv / oof_predictions.csv, folds stratified on `given`."""
    folds = np.zeros(len(paths), dtype=int)
    for k, (_, held_out) in enumerate(StratifiedKFold(N_FOLDS, shuffle=True, random_state=0).split(paths, given)):
        folds[held_out] = k
    frame = pd.DataFrame(
        {
            "path": paths,
            "fold": folds,
            "true": [CLASSES[k] for k in given],
            "predicted": [CLASSES[k] for k in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    return pd.concat([frame, pd.DataFrame(probs, columns=[f"prob_{c}" for c in CLASSES])], axis=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Images, OOF predictions with flipped labels, and one random-init resnet18 model file per fold."""
    tmp = tmp_path_factory.mktemp("analysis")
    root = tmp / "data" / "train"
    paths, labels = write_tinted(root)
    given, flipped = flip_labels(labels)
    rows = oof_rows(paths, given, colour_probs(root, paths))
    rows.to_csv(tmp / "oof_predictions.csv", index=False)
    models = {}
    for fold in range(N_FOLDS):
        torch.manual_seed(fold)
        net = torchvision.models.resnet18(weights=None, num_classes=len(CLASSES))
        meta = {
            "backbone": "resnet18",
            "classes": CLASSES,
            "image_size": 32,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "fold": fold,
        }
        models[fold] = save_model_file(
            tmp / f"cnn_resnet18_freeze_backbone_True_fold_{fold}.pth", net.state_dict(), meta
        )
    return {"tmp": tmp, "root": root, "rows": rows, "models": models, "flipped": [paths[i] for i in flipped]}


def test_label_issues_find_flipped_labels(dataset: dict, tmp_path: Path) -> None:
    """The probabilities are what a good model would say from each image's colour, not a trained model's
    output: the component under test is the ranking of label issues on OOF probabilities, whatever made them."""
    oof = read_oof(dataset["tmp"] / "oof_predictions.csv")
    issues = find_label_issues(oof)
    found = set(issues["path"]) & set(dataset["flipped"])
    assert len(found) >= FLIPPED - 1
    assert len(issues) <= FLIPPED + 2, "few false alarms on correctly labelled images"
    assert issues["score"].is_monotonic_increasing, "most suspicious (lowest self-confidence) first"
    index = {p: i for i, p in enumerate(oof.paths)}
    for row in issues[issues["path"].isin(found)].itertuples():
        assert row.given == CLASSES[1] and row.suggested == CLASSES[0]  # flipped 0 -> 1; the colour says 0
        assert row.score == pytest.approx(oof.probs[index[row.path], 1])

    written = write_label_issues(issues, dataset["root"], tmp_path)
    assert [p.name for p in written] == ["label_issues.csv", "label_issues.png"]
    back = pd.read_csv(tmp_path / "label_issues.csv", dtype={"path": str, "given": str, "suggested": str})
    assert back[["path", "given", "suggested"]].equals(issues[["path", "given", "suggested"]])
    with Image.open(tmp_path / "label_issues.png") as image:
        assert image.width == 240 * len(issues)  # one 2.4-inch cell per issue at 100 dpi, in one row


def test_expected_calibration_error_matches_its_definition() -> None:
    """80 % confident and 80 % right is calibrated; always sure and half right is 0.5 off."""
    labels = np.array([0] * 8 + [1] * 2)
    probs = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)
    sure = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(sure, np.array([0, 1] * 5)) == pytest.approx(0.5)


def test_temperature_scaling_fixes_an_over_confident_model() -> None:
    """Labels drawn from softmax(z) are calibrated for z; a model that outputs softmax(5 z) is over-confident."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 5))
    calibrated = softmax(logits, axis=1)
    labels = np.array([rng.choice(5, p=p) for p in calibrated])
    over = softmax(5 * logits, axis=1)

    temperature = fit_temperature(np.log(over), labels)
    scaled = apply_temperature(over, temperature)
    assert 4.0 < temperature < 6.0
    assert expected_calibration_error(calibrated, labels) < 0.03
    assert expected_calibration_error(scaled, labels) < expected_calibration_error(over, labels) / 3
    assert (scaled.argmax(axis=1) == over.argmax(axis=1)).all()
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_cam_target_layers_across_families() -> None:
    """The last convolutional stage of a CNN; none for a vision transformer, whose only map is the patch embedding."""
    x = torch.randn(2, 3, 64, 64)
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    assert target_layer(resnet, x) is resnet.layer4
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=3).eval()
    assert target_layer(mobilenet, x) is mobilenet.features
    vit = torchvision.models.VisionTransformer(64, 16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    assert target_layer(vit.eval(), x) is None
    assert class_activation_maps(vit, x, [0, 1]) is None

    maps = class_activation_maps(resnet, x, [0, 2])
    assert maps.shape == (2, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1 and maps.std() > 0


def test_thumbnails_fill_their_square_and_keep_their_shape() -> None:
    """An 8 px digit grows to the square with its pixels intact; a wide photo shrinks to its width; grey and
    float images become uint8 RGB."""
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8)
    big = fit_square(digit, 220)
    assert big.shape == (220, 220, 3) and big.dtype == np.uint8
    assert big[0, 0, 0] == 0 and big[-1, -1, 0] == 63 and set(np.unique(big)) <= set(range(64))
    wide = fit_square(np.random.default_rng(0).random((300, 600, 3)), 220)
    assert wide.shape == (110, 220, 3) and wide.dtype == np.uint8


def test_cam_back_propagates_from_the_map_only_and_gives_grad_cams_maps() -> None:
    """Starting autograd at the target map changes no map (densenet applies an in-place ReLU to it) and leaves
    the network's parameters as trainable as they were."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    x, classes = torch.randn(3, 3, 64, 64), [0, 2, 1]
    resnet = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    resnet.layer1.requires_grad_(False)  # a partly frozen network gets its own flags back
    for net in (resnet, torchvision.models.densenet121(weights=None, num_classes=3).eval()):
        trainable = [p.requires_grad for p in net.parameters()]
        with GradCAM(model=net, target_layers=[target_layer(net, x)]) as cam:
            expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(k) for k in classes])
        np.testing.assert_allclose(class_activation_maps(net, x, classes), expected, atol=1e-6)
        assert [p.requires_grad for p in net.parameters()] == trainable


def test_write_report(dataset: dict, tmp_path: Path) -> None:
    oof_csv = dataset["tmp"] / "oof_predictions.csv"
    metrics = write_report(oof_csv, dataset["models"], dataset["root"], tmp_path, top_k=16)
    oof = read_oof(oof_csv)
    assert set(metrics) == {"n_label_issues", "ece", "ece_after_temperature", "temperature"}
    assert metrics["n_label_issues"] >= FLIPPED - 1
    assert 0 <= metrics["ece"] <= 1 and 0 <= metrics["ece_after_temperature"] <= 1
    assert metrics["temperature"] > 1, "confidently wrong (flipped) labels: the probabilities are over-confident"

    pairs = pd.read_csv(tmp_path / "confused_pairs.csv", dtype={"true": str, "predicted": str})
    errors = oof.labels != oof.predicted
    assert pairs["count"].sum() == errors.sum() and pairs["count"].is_monotonic_decreasing
    assert (pairs["true"] != pairs["predicted"]).all()
    first = pairs.iloc[0]
    assert (first.true, first.predicted) == (CLASSES[1], CLASSES[0])  # the flipped labels
    support = dict(zip(CLASSES, np.bincount(oof.labels), strict=True))
    assert first.share_of_true == pytest.approx(first["count"] / support[first.true])

    per_class = pd.read_csv(tmp_path / "per_class.csv", dtype={"class": str})
    assert list(per_class["class"]) == CLASSES and per_class["support"].sum() == len(oof)
    recall = [(oof.predicted[oof.labels == k] == k).mean() for k in range(len(CLASSES))]
    np.testing.assert_allclose(per_class["recall"], recall)
    fold_recalls = [[(oof.predicted[(oof.labels == 1) & (oof.folds == f)] == 1).mean()] for f in range(N_FOLDS)]
    assert per_class.loc[1, "recall_fold_mean"] == pytest.approx(np.mean(fold_recalls))
    assert per_class.loc[1, "recall_fold_std"] == pytest.approx(np.std(fold_recalls))

    top = pd.read_csv(tmp_path / "top_losses.csv", dtype={"path": str})
    assert len(top) == 16 and top["loss"].is_monotonic_decreasing
    assert set(top["path"][:FLIPPED]) == set(dataset["flipped"])
    with Image.open(tmp_path / "top_losses.png") as image:
        assert image.width == 6 * 240 and image.height > 3 * 280  # 16 thumbnails: 3 rows of 6

    page = (tmp_path / "index.html").read_text()
    assert html.escape(CLASSES[0]) in page and CLASSES[0] not in page
    for source in re.findall(r"<img src='([^']+)'", page):
        assert (tmp_path / source).is_file(), source
    assert {"top_losses.png", "label_issues.png", "reliability.png"} <= set(re.findall(r"<img src='([^']+)'", page))


def test_write_report_without_errors_or_models(dataset: dict, tmp_path: Path) -> None:
    """Correct labels and no model files: no confused pairs or label issues, and a gallery without CAMs."""
    rows = dataset["rows"].copy()
    probs = rows[[f"prob_{c}" for c in CLASSES]].to_numpy()
    rows["true"] = [CLASSES[k] for k in probs.argmax(axis=1)]
    rows.to_csv(tmp_path / "oof.csv", index=False)
    metrics = write_report(tmp_path / "oof.csv", {}, dataset["root"], tmp_path / "report", top_k=4)
    assert metrics["n_label_issues"] == 0
    assert pd.read_csv(tmp_path / "report" / "confused_pairs.csv").empty
    assert not (tmp_path / "report" / "label_issues.png").exists()
    with Image.open(tmp_path / "report" / "top_losses.png") as image:
        assert image.width == 4 * 240

    rows.drop(columns=[f"prob_{c}" for c in CLASSES]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(UserError, match="prob_<class>"):
        read_oof(tmp_path / "bad.csv")


def _job(folder: Path, overrides: list[str], rows: pd.DataFrame, model: Path, cwd: Path) -> None:
    """One Hydra job folder as train.py writes it in a sweep."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "model").mkdir()
    rows.to_csv(folder / "val_predictions.csv", index=False)
    os.link(model, folder / "model" / model.name)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "config.yaml").write_text(f"n_folds: {N_FOLDS}\ndata:\n  train_dir: data/train\n")
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {cwd}\n")


def test_cli_on_a_sweep_folder(dataset: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two configurations (lr) x 3 folds: one report each, named by what sets them apart."""
    sweep = tmp_path / "multirun" / "2026-01-02" / "03-04-05"
    rows = dataset["rows"]
    for lr in ("0.001", "0.01"):
        for fold in range(N_FOLDS):
            overrides = ["experiment=sample", f"fold={fold}", f"lr={lr}"]
            name = ",".join(o for o in overrides if not o.startswith("experiment"))
            _job(sweep / name, overrides, rows[rows["fold"] == fold], dataset["models"][fold], dataset["tmp"])
    assert main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "report" / f"lr={lr}" / "index.html") for lr in ("0.001", "0.01")]
    assert all(Path(p).is_file() for p in printed)

    for job in sweep.glob("fold=2,*"):
        (job / "val_predictions.csv").unlink()
    assert main([str(sweep), "--out", str(tmp_path / "partial")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "lacks fold(s) 2 of 3" in error and "\n" not in error

    assert main([str(tmp_path / "missing" / "sweep")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_on_a_parent_run(dataset: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A parent run with three finished fold runs in a real sqlite store, laid out as train.py logs them."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("analysis", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment).info.run_id
    client.log_artifact(parent, str(dataset["tmp"] / "oof_predictions.csv"), "oof")
    hydra_file = tmp_path / "hydra.yaml"
    hydra_file.write_text(f"hydra:\n  runtime:\n    cwd: {dataset['tmp']}\n")
    for fold, model in dataset["models"].items():
        child = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "fold": str(fold)}).info.run_id
        client.log_param(child, "data.train_dir", "data/train")
        client.log_artifact(child, str(hydra_file), "config")
        client.log_artifact(child, str(model), "exported")
        client.set_terminated(child, "FINISHED")

    out = tmp_path / "report"
    assert main([parent, "--tracking-uri", uri, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert (out / "top_losses.png").is_file() and (out / "label_issues.csv").is_file()

    assert main([child, "--tracking-uri", uri]) == 2
    assert f"pass its parent run {parent}" in capsys.readouterr().err


def test_training_imports_the_duplicate_audit_without_the_report_libraries() -> None:
    """Every training job imports src.analysis.duplicates; the report's libraries load only when a name is used."""
    import subprocess
    import sys

    code = (
        "import sys; import src.analysis.duplicates; "
        "heavy = {'pytorch_grad_cam', 'cleanlab', 'sklearn.calibration'} & set(sys.modules); "
        "assert not heavy, heavy; "
        "from src.analysis import write_report, OOF; assert 'pytorch_grad_cam' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
