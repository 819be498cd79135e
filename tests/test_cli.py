"""The real command lines: train.py for one fold and for a sweep, test.py on .pth and .ckpt, bad input."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, tiny_overrides

ONE_LINE_ERROR = "error: "


def error_line(result) -> str:
    """A bad-input failure is exit status 2 and exactly one line on stderr, no traceback."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith(ONE_LINE_ERROR), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(image_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fold trained by `python train.py fold=0` (no tracking)."""
    tmp = tmp_path_factory.mktemp("train")
    result = run_cli("train.py", *tiny_overrides(image_root, tmp), "fold=0", "logger=none", "epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "best_val_accuracy: " in result.stdout
    return tmp


def test_train_one_fold_writes_model_reports_and_split(trained: Path) -> None:
    model_path = trained / "models" / "cnn_resnet18_freeze_backbone_True_fold_0.pth"
    saved = torch.load(model_path, weights_only=True)
    assert saved["classes"] == ["cat", "dog", "fox"] and saved["backbone"] == "resnet18" and saved["fold"] == 0
    assert 0.0 <= saved["best_val_accuracy"] <= 1.0
    out = trained / "outputs"
    with (out / "split.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and {r["fold"] for r in rows} == {"0", "1"}
    with (out / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [h["epoch"] for h in history] == ["0", "1"]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_f1", "lr"} <= history[0].keys()
    for name in ("curves_loss.png", "curves_accuracy.png", "val_confusion_matrix.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro avg" in (out / "val_classification_report.txt").read_text()
    # best.ckpt stays (weights only; here, frozen, the head and the backbone digest); last.ckpt goes with the fold
    assert (out / "checkpoints" / "best.ckpt").is_file() and not (out / "checkpoints" / "last.ckpt").exists()
    assert os.path.getsize(out / "checkpoints" / "best.ckpt") < 1_000_000


def test_test_py_scores_the_exported_pth_and_the_ckpt_alike(trained: Path, image_root: Path) -> None:
    scores = []
    for i, ckpt in enumerate(
        [trained / "models" / "cnn_resnet18_freeze_backbone_True_fold_0.pth", trained / "outputs/checkpoints/best.ckpt"]
    ):
        out = trained / f"test{i}"
        result = run_cli(
            "test.py", f"ckpt={ckpt}", f"data.test_dir={image_root / 'test'}", "logger=none", f"hydra.run.dir={out}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((out / "test_metrics.json").read_text())
        assert {"accuracy", "loss", "f1", "balanced_accuracy", "precision", "recall"} <= metrics.keys()
        with (out / "test_predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 9 and rows[0].keys() == {"path", "true", "predicted", "confidence"}
        correct = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
        assert metrics["accuracy"] == pytest.approx(correct)
        assert "precision" in result.stdout and "support" in result.stdout  # the printed tables
        assert (out / "test_confusion_matrix.png").is_file()
        assert "dog" in (out / "test_classification_report.txt").read_text()
        scores.append({k: v for k, v in metrics.items() if k != "ckpt"})
    assert scores[0] == pytest.approx(scores[1])


def test_sweep_over_folds_and_lr_names_job_folders_by_override(image_root: Path, tmp_path: Path) -> None:
    quiet = "trainer.enable_progress_bar=false"  # a display setting: the job folders are named without it
    result = run_cli(
        "train.py", "-m", *tiny_overrides(image_root, tmp_path), "logger=none", "fold=0,1", "lr=1e-3,1e-4", quiet
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert jobs == ["fold=0,lr=0.0001", "fold=0,lr=0.001", "fold=1,lr=0.0001", "fold=1,lr=0.001"]
    assert result.stdout.count("best_val_accuracy: ") == 4
    for job in jobs:
        assert (tmp_path / "multirun" / job / "history.csv").is_file()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "cnn_resnet18_freeze_backbone_True_fold_0.pth",
        "cnn_resnet18_freeze_backbone_True_fold_1.pth",
    ]


def test_missing_data_is_one_line_naming_dvc_pull(tmp_path: Path, image_root: Path) -> None:
    overrides = [o for o in tiny_overrides(image_root, tmp_path) if not o.startswith("data.train_dir")]
    line = error_line(run_cli("train.py", *overrides, f"data.train_dir={tmp_path / 'nothing'}", "logger=none"))
    assert "dvc pull" in line and "make data" in line


def test_fold_out_of_range_is_one_line(tmp_path: Path, image_root: Path) -> None:
    line = error_line(run_cli("train.py", *tiny_overrides(image_root, tmp_path), "fold=2", "logger=none"))
    assert "fold=2 is outside [0, 2)" in line


def test_unknown_backbone_is_one_line(tmp_path: Path, image_root: Path) -> None:
    line = error_line(
        run_cli("train.py", *tiny_overrides(image_root, tmp_path), "model.name=resnet9000", "logger=none")
    )
    assert "unknown backbone" in line


def test_a_model_in_a_store_that_does_not_exist_is_one_line_and_creates_none(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    line = error_line(
        run_cli("test.py", "ckpt=models:/resnet18_classifier@champion", f"logger.tracking_uri=sqlite:///{store}")
    )
    assert "no MLflow store" in line and not store.exists()


def test_a_setting_added_by_mistake_is_named_with_the_one_meant(tmp_path: Path) -> None:
    """`+epoch=1`, as Hydra advises for the typo `epoch=1`, would otherwise train the default epochs silently."""
    result = run_cli("train.py", "+epoch=1", f"data.train_dir={tmp_path / 'none'}", "logger=none")
    said = "+epoch=1 adds a setting that train.py does not read; did you mean epochs=1?"
    assert said in result.stdout + result.stderr


def test_an_override_hydra_cannot_read_says_how_to_quote_it(tmp_path: Path) -> None:
    """Hydra's grammar refuses unquoted letters outside ASCII, and `=` inside a value (a sweep job's folder)."""
    line = error_line(run_cli("predict.py", "ckpt=m.pth", f"input={tmp_path}/café"))
    assert f"""'input="{tmp_path}/café"'""" in line
    line = error_line(run_cli("test.py", "ckpt=multirun/day/time/fold=0,lr=0.001/model/m.pth"))
    assert """'ckpt="multirun/day/time/fold=0,lr=0.001/model/m.pth"'""" in line


@pytest.mark.parametrize(
    ("setting", "said"), [("batch_size=0", "batch_size=0 must be a whole number > 0"), ("lr=abc", "lr=abc must be")]
)
def test_bad_numbers_are_one_line(tmp_path: Path, image_root: Path, setting: str, said: str) -> None:
    """PyTorch's own errors for these come from inside a DataLoader or the optimizer, as a traceback."""
    assert said in error_line(run_cli("train.py", *tiny_overrides(image_root, tmp_path), setting, "logger=none"))


def test_unknown_test_class_and_bad_ckpt_are_one_line(trained: Path, tmp_path: Path) -> None:
    model = trained / "models" / "cnn_resnet18_freeze_backbone_True_fold_0.pth"
    (tmp_path / "test" / "wolf").mkdir(parents=True)
    torch.save({}, tmp_path / "empty.pth")
    from tests.conftest import write_images

    write_images(tmp_path / "test", per_class=1)
    import shutil

    shutil.copy(tmp_path / "test" / "cat" / "000.png", tmp_path / "test" / "wolf" / "000.png")
    base = ["logger=none", f"data.test_dir={tmp_path / 'test'}", f"hydra.run.dir={tmp_path / 'out'}"]
    line = error_line(run_cli("test.py", f"ckpt={model}", *base))
    assert "wolf" in line and "not trained on" in line
    assert "batch_size=-4 must be" in error_line(run_cli("test.py", f"ckpt={model}", *base, "batch_size=-4"))
    gone = tmp_path / "gone.pth"
    assert f"ckpt={gone} does not exist" in error_line(run_cli("test.py", f"ckpt={gone}", *base))
    # the model is checked before the images: a bad ckpt is named even when data.test_dir is missing too
    nowhere = ["logger=none", f"data.test_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'out'}"]
    assert "data.test_dir" in error_line(run_cli("test.py", f"ckpt={model}", *nowhere))
    assert f"ckpt={gone} does not exist" in error_line(run_cli("test.py", f"ckpt={gone}", *nowhere))
    (tmp_path / "bad.ckpt").write_bytes(b"\x00garbage")
    assert "not a readable PyTorch file" in error_line(run_cli("test.py", f"ckpt={tmp_path / 'bad.ckpt'}", *base))
    assert "ckpt=" in error_line(run_cli("test.py", *base))


def test_heavy_imports_freeze_once_and_leave_the_collector_on() -> None:
    """src.runtime: the first entry point's imports run without the cyclic GC and are frozen afterwards; a later
    job's call freezes nothing more (that would keep the previous job's garbage), and the collector is back on."""
    import subprocess
    import sys

    code = """
import gc
from src.runtime import heavy_imports
with heavy_imports():
    assert not gc.isenabled()
    import json, decimal
first = gc.get_freeze_count()
garbage = [[] for _ in range(1000)]
with heavy_imports():
    pass
print(gc.isenabled(), first > 0, gc.get_freeze_count() == first)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert result.stdout.split() == ["True", "True", "True"], result.stderr


def test_a_job_s_first_use_modules_are_imported_with_the_heavy_imports() -> None:
    """src.training.import_first_use_modules: MLflow's store stack only with the MLflow logger, scikit-learn's
    splitters always; every name on the lists imports."""
    import subprocess
    import sys

    code = """
import sys
from omegaconf import OmegaConf
from src.training import import_first_use_modules
import_first_use_modules(OmegaConf.create({"logger": {}}))
before = "mlflow" in sys.modules
import_first_use_modules(OmegaConf.create({"logger": {"experiment_name": "e"}}))
print(before, "sklearn.model_selection" in sys.modules, "mlflow.store.tracking.sqlalchemy_store" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert result.stdout.split() == ["False", "True", "True"], result.stderr


def test_a_sweep_composes_each_job_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """src.runtime.compose_each_job_once: the launcher gets the config the sweeper composed to check the job, each
    job its own, once; a job nobody checked is composed as before; Hydra is as it was after the block."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from hydra.plugins.sweeper import Sweeper
    from hydra.types import HydraContext
    from omegaconf import OmegaConf

    from src.runtime import compose_each_job_once

    composed: list[str] = []
    real = ConfigLoaderImpl.load_configuration

    def counted(self: ConfigLoaderImpl, config_name: str, overrides: list[str], **kwargs: object) -> object:
        composed.append(overrides[-1] if overrides else "")
        return real(self, config_name, overrides, **kwargs)

    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counted)
    original = (ConfigLoaderImpl.load_sweep_config, Sweeper.validate_batch_is_legal)
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        # Hydra's plugin scan loads the basic sweeper's module anew: its class is the one the scan found
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        sweeper = BasicSweeper(max_batch_size=None, params=None)
        sweeper.config = master
        sweeper.hydra_context = HydraContext(config_loader=loader, callbacks=None)  # type: ignore[arg-type]
        composed.clear()
        with compose_each_job_once():
            sweeper.validate_batch_is_legal([["fold=1", "lr=0.01"], ["fold=2"]])
            jobs = [loader.load_sweep_config(master, o) for o in (["fold=1", "lr=0.01"], ["fold=2"], ["fold=2"])]
            unchecked = loader.load_sweep_config(master, ["fold=3"])
    # the check composes each job; launching them composes nothing more, until a job is launched twice
    assert composed == ["lr=0.01", "fold=2", "fold=2", "fold=3"]
    assert [(c.fold, c.lr) for c in (*jobs, unchecked)] == [(1, 0.01), (2, 0.001), (2, 0.001), (3, 0.001)]
    assert jobs[1] is not jobs[2] and OmegaConf.to_yaml(jobs[1]) == OmegaConf.to_yaml(jobs[2])
    assert (ConfigLoaderImpl.load_sweep_config, Sweeper.validate_batch_is_legal) == original


@pytest.mark.parametrize(("local_rank", "started"), [(None, "True"), ("1", "False")])
def test_the_plot_helper_starts_before_the_imports_but_not_in_extra_ddp_processes(
    local_rank: str | None, started: str
) -> None:
    """src.runtime.start_plot_helper: train.py starts the figure helper (with matplotlib loaded) while it imports;
    the extra processes of a DDP run, which draw nothing, start none."""
    import subprocess
    import sys

    code = """
from src import plots
from src.runtime import start_plot_helper
start_plot_helper()
print(plots._helper is not None and len(plots._helper._processes) == 1)
"""
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    if local_rank:
        env["LOCAL_RANK"] = local_rank
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, check=True)
    assert result.stdout.split() == [started], result.stderr
