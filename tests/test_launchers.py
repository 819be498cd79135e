"""Launchers with the settings users have: loader worker processes inside joblib (loky) workers, `auto` workers
shared among parallel jobs, and the SLURM launcher config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from joblib import Parallel, delayed

from src.data import available_cpus, resolve_num_workers
from src.errors import UserError
from tests.conftest import ROOT, run_cli, tiny_overrides
from tests.launcher_helpers import first_batch_in_this_process


def test_a_loader_starts_real_workers_inside_a_loky_worker(image_root: Path) -> None:
    """loky forces its own start method on its workers; a loader there must still start its worker process."""
    paths = ["cat/000.png", "dog/000.png", "fox/000.png"]
    (inside,) = Parallel(n_jobs=2, backend="loky")(
        delayed(first_batch_in_this_process)(str(image_root / "train"), paths) for _ in range(1)
    )
    assert inside["start_method"] == "loky"  # the state that broke DataLoader workers
    assert inside["shape"] == (3, 3, 32, 32) and inside["targets"] == [0, 1, 2]


def test_joblib_sweep_with_loader_workers_trains_both_folds(image_root: Path, tmp_path: Path) -> None:
    """The user's command: two folds at once through joblib, images decoded by loader worker processes."""
    record = tmp_path / "workers" / "${fold}.json"
    result = run_cli(
        "train.py",
        "-m",
        *tiny_overrides(image_root, tmp_path),
        "logger=none",
        "fold=0,1",
        "data.num_workers=1",
        "model.freeze_backbone=false",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "+callbacks.workers._target_=tests.launcher_helpers.RecordLoaderWorkers",
        f"+callbacks.workers.path={record}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Got pickle error" not in result.stderr and "iter(combined_loader)" not in result.stderr
    assert result.stdout.count("best_val_accuracy: ") == 2
    for fold in (0, 1):
        assert (tmp_path / "models" / f"cnn_resnet18_freeze_backbone_False_fold_{fold}.pth").is_file()
        seen = json.loads((tmp_path / "workers" / f"{fold}.json").read_text())
        assert seen["workers"] >= 1, seen  # the training loader's persistent worker, alive at epoch end
    # Figures are drawn in a helper process (src/plots.py); a loky worker, which may be ended without its exit
    # hooks, waits for them before its job returns.
    figures = sorted(p.name for p in (tmp_path / "multirun").rglob("*.png"))
    assert figures == sorted(["curves_accuracy.png", "curves_loss.png", "val_confusion_matrix.png"] * 2), figures


CPUS = available_cpus()


@pytest.mark.parametrize(
    ("launcher", "jobs"),
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], 2),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], CPUS),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-2"], max(1, CPUS - 1)),
        (["hydra/launcher=slurm"], 1),  # each array task has CPUs of its own: `auto` sees its allocation
        ([], 1),  # the basic launcher runs one job at a time
    ],
)
def test_parallel_jobs_follow_the_launcher(launcher: list[str], jobs: int) -> None:
    from src.training import parallel_jobs

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*launcher, "hydra.mode=MULTIRUN"], return_hydra_config=True)
    assert parallel_jobs() == 1  # outside Hydra
    HydraConfig.instance().set_config(cfg)
    try:
        assert parallel_jobs() == jobs
    finally:
        HydraConfig.instance().cfg = None


def test_auto_workers_share_the_cpus_among_parallel_jobs() -> None:
    cpus = available_cpus()
    assert resolve_num_workers("auto") == max(0, min(8, cpus - 1))
    for jobs in (1, 2, 3, cpus, 4 * cpus):
        workers = resolve_num_workers("auto", jobs)
        assert 0 <= workers <= 8 and jobs * (workers + 1) <= max(cpus, jobs)  # a process each + its workers
    assert resolve_num_workers(3, 2) == 3  # a number is taken as given
    for bad in ("many", -1):
        with pytest.raises(UserError, match="must be `auto` or a whole number"):
            resolve_num_workers(bad)
