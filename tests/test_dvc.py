"""DVC: data.dvc, the Google Drive remote and its credentials, a real round trip, the data version, `dvc repro`.

Everything runs offline: the round trip uses a local folder as the remote, and the Drive test
stops where the first request to Google would go. The pipeline runs on tiny images in a copy
of the repository, so it exercises the real dvc.yaml, params.yaml and train.py / test.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from src.tracking.data_version import dvc_data_version
from tests.conftest import CLASSES, ROOT, write_images

PIPELINE_FILES = (
    "conf",
    "src",
    "train.py",
    "test.py",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvcignore",
    ".gitignore",
)


def run(
    *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A command as a user types it; `dvc` is this interpreter's, and stage commands find its `python`."""
    command = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("GDRIVE_CREDENTIALS_DATA", "MLFLOW_TRACKING_URI")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        **(env or {}),
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def init_repo(path: Path) -> Path:
    """An empty git + DVC repository with its own git identity (for `dvc exp run`) and no update checks."""
    path.mkdir(parents=True, exist_ok=True)
    run("git", "init", "-q", cwd=path)
    run("git", "config", "user.name", "test", cwd=path)
    run("git", "config", "user.email", "test@example.com", cwd=path)
    run("dvc", "init", "-q", cwd=path)
    run("dvc", "config", "core.check_update", "false", cwd=path)
    return path


def tracked_md5(dvc_file: Path) -> str:
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose data/ (real PNGs: 3 classes, 4 train + 2 test images each) is in data.dvc."""
    repo = init_repo(tmp_path_factory.mktemp("data-repo"))
    write_images(repo / "data" / "train", per_class=4)
    write_images(repo / "data" / "test", per_class=2, seed=1)
    run("dvc", "add", "-q", "data", cwd=repo)
    return repo


# data.dvc and the sample data


def test_a_fresh_clone_with_the_sample_data_matches_data_dvc(tmp_path: Path) -> None:
    """What `make data` does in a fresh clone: write the sample, `dvc commit data.dvc`; then `dvc status` is clean.

    `dvc commit` refuses, changing nothing, unless the bytes hash to what the committed data.dvc records.
    """
    committed = (ROOT / "data.dvc").read_text()
    out = yaml.safe_load(committed)["outs"][0]
    assert out["path"] == "data" and out["nfiles"] == 1797
    repo = init_repo(tmp_path / "clone")
    (repo / "data.dvc").write_text(committed)
    run(sys.executable, "-m", "src.sample_data", "--out", str(repo / "data"), cwd=ROOT)
    assert "not in cache" in run("dvc", "status", cwd=repo).stdout
    run("dvc", "commit", "--quiet", "data.dvc", cwd=repo)
    assert json.loads(run("dvc", "status", "--json", cwd=repo).stdout) == {}
    assert (repo / "data.dvc").read_text() == committed


def test_credentials_and_outputs_stay_out_of_git() -> None:
    """Keys, the local config, data and pipeline results are ignored; the DVC files that describe them are not."""
    ignored = [
        ".dvc/config.local",
        ".dvc/gdrive-service-account.json",
        "gdrive-key.json",
        "my-project-service-account.json",
        "data/train/0/0000.png",
        "outputs/dvc/cv/metrics.json",
        "dvc_plots/index.html",
        ".dvc/cache/files/md5/00/0",
    ]
    kept = [".dvc/config", ".dvcignore", "data.dvc", "dvc.yaml", "dvc.lock", "params.yaml"]
    result = run("git", "check-ignore", "--no-index", *ignored, *kept, cwd=ROOT, check=False)
    assert result.stdout.split() == ignored


# The Google Drive remote


def committed_config() -> dict[str, Any]:
    """.dvc/config alone, as every clone has it (no config.local, no global config)."""
    from configobj import ConfigObj

    return ConfigObj(str(ROOT / ".dvc" / "config")).dict()


def test_gdrive_remote_uses_a_service_account_and_holds_no_key() -> None:
    config = committed_config()
    remote = config['remote "gdrive_remote"']
    assert remote["url"].startswith("gdrive://")
    assert remote["gdrive_use_service_account"] == "true" and remote["gdrive_acknowledge_abuse"] == "true"
    assert config["core"]["autostage"] == "false"
    # A key path here would beat GDRIVE_CREDENTIALS_DATA (pydrive2 reads the file first), and a default
    # remote whose key is missing breaks `dvc exp run` and `dvc checkout`: both belong in config.local.
    assert not {"gdrive_service_account_json_file_path", "gdrive_user_credentials_file"} & remote.keys()
    assert "remote" not in config["core"]


@pytest.fixture
def clone_config(tmp_path: Path) -> Path:
    """A DVC project with only the committed .dvc/config, so no local setting changes what is tested."""
    repo = tmp_path / "clone"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    return repo


def dummy_service_account_key() -> tuple[dict[str, str], Any]:
    """A service-account key with the fields of a real one and a fresh RSA key (never written to the repository)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {
        "type": "service" + "_account",  # built here: the literal marks a real key for secret scanners
        "project_id": "dvc-test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": "dvc-data@dvc-test-project.iam.gserviceaccount.com",
        "client_id": "123456789012345678901",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    return key, private_key.public_key()


def verify_jwt(token: str, public_key: Any) -> dict[str, Any]:
    """Check an RS256 JWT's signature and return its claims."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header, claims, signature = token.split(".")
    public_key.verify(b64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    assert json.loads(b64(header))["alg"] == "RS256"
    return json.loads(b64(claims))


@pytest.mark.parametrize("source", ["GDRIVE_CREDENTIALS_DATA", "config.local"])
def test_gdrive_filesystem_signs_in_with_a_service_account_key(
    source: str, clone_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The remote, built by DVC from .dvc/config, gets as far as asking Google for a token.

    The signed token request (a JWT) is checked against the key's public half; sending it would be
    the first network call, so the test stops there.
    """
    from dvc.repo import Repo
    from dvc_gdrive import GDriveFileSystem

    key, public_key = dummy_service_account_key()
    monkeypatch.delenv("GDRIVE_CREDENTIALS_DATA", raising=False)
    if source == "GDRIVE_CREDENTIALS_DATA":
        monkeypatch.setenv("GDRIVE_CREDENTIALS_DATA", json.dumps(key))
    else:
        key_file = tmp_path / "keys" / "dvc-data.json"
        key_file.parent.mkdir()
        key_file.write_text(json.dumps(key))
        run(
            "dvc",
            "remote",
            "modify",
            "--local",
            "gdrive_remote",
            "gdrive_service_account_json_file_path",
            str(key_file),
            cwd=clone_config,
        )
    with Repo(str(clone_config), uninitialized=True) as repo:
        fs = repo.cloud.get_remote("gdrive_remote").fs
        assert isinstance(fs, GDriveFileSystem)
        drive = fs.fs  # pydrive2's filesystem: signs in here, offline
    assert drive._acknowledge_abuse is True
    credentials = drive.client.auth.credentials
    assert credentials.service_account_email == key["client_email"]
    claims = verify_jwt(credentials._generate_assertion().decode(), public_key)
    assert claims["iss"] == key["client_email"] and claims["aud"] == key["token_uri"]
    assert "https://www.googleapis.com/auth/drive" in claims["scope"].split()


def test_gdrive_without_a_key_says_how_to_give_one(clone_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dvc.repo import Repo
    from dvc_objects.fs.errors import ConfigError

    monkeypatch.delenv("GDRIVE_CREDENTIALS_DATA", raising=False)
    with Repo(str(clone_config), uninitialized=True) as repo, pytest.raises(ConfigError, match="service account"):
        repo.cloud.get_remote("gdrive_remote")


def test_dvc_doctor_lists_gdrive_support_and_the_remote() -> None:
    out = run("dvc", "doctor", cwd=ROOT).stdout
    supports = out.split("Supports:", 1)[1]
    assert "gdrive (pydrive2 = " in supports
    assert "Remotes: gdrive" in out


# A real round trip through a local remote


def test_push_delete_pull_restores_identical_bytes_and_a_change_moves_the_hash(data_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(data_repo, repo)
    remote = tmp_path / "remote"
    run("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    original = read_tree(repo / "data")
    assert len(original) == 18

    run("dvc", "push", "-q", cwd=repo)
    assert json.loads(run("dvc", "status", "-c", "--json", cwd=repo).stdout) == {}
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    cloud = json.loads(run("dvc", "status", "-c", "--json", cwd=repo).stdout)
    assert len(cloud) == 18 and set(cloud.values()) == {"deleted"}  # on the remote only
    run("dvc", "pull", "-q", cwd=repo)
    assert read_tree(repo / "data") == original

    before = tracked_md5(repo / "data.dvc")
    write_images(repo / "data" / "train", per_class=1, seed=99)  # rewrites one image per class
    assert "data.dvc" in json.loads(run("dvc", "status", "--json", cwd=repo).stdout)
    run("dvc", "add", "-q", "data", cwd=repo)
    assert tracked_md5(repo / "data.dvc") != before
    cloud = json.loads(run("dvc", "status", "-c", "--json", cwd=repo).stdout)
    assert cloud == {"data": "new", **{f"data/train/{c}/000.png": "new" for c in CLASSES}}  # here, not yet pushed
    run("dvc", "push", "-q", cwd=repo)
    assert json.loads(run("dvc", "status", "-c", "--json", cwd=repo).stdout) == {}


# The data version that every training and test run records


def test_data_version_is_the_md5_in_data_dvc_and_matches(data_repo: Path) -> None:
    tags = dvc_data_version(data_repo / "data" / "train", data_repo / "data.dvc")
    assert tags["data_version"] == tracked_md5(data_repo / "data.dvc")
    assert tags["data_matches_dvc"] == "true"
    assert dvc_data_version(data_repo / "elsewhere", data_repo / "data.dvc") == {}


def test_data_version_warns_when_the_workspace_data_changed(
    data_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(data_repo, repo)
    image = repo / "data" / "train" / "cat" / "000.png"
    image.write_bytes((repo / "data" / "train" / "dog" / "000.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="src.data"):
        tags = dvc_data_version(repo / "data" / "train", repo / "data.dvc")
    assert tags["data_version"] == tracked_md5(repo / "data.dvc") and tags["data_matches_dvc"] == "false"
    assert any("differs from" in r.getMessage() and "dvc add" in r.getMessage() for r in caplog.records)


# The pipeline's settings and its CV report


def test_every_param_reaches_a_stage_command_and_names_an_existing_config() -> None:
    """params.yaml and dvc.yaml stay in sync: no setting is silently ignored, and the folds match n_folds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pipeline = (ROOT / "dvc.yaml").read_text()
    for group in ("train", "test"):
        for key in params[group]:
            assert f"${{{group}.{key}}}" in pipeline, f"{group}.{key} is not passed to any stage"
    assert "${logger}" in pipeline and "foreach: ${folds}" in pipeline
    assert params["folds"] == list(range(params["train"]["n_folds"]))
    for group in ("model", "optimizer"):
        assert (ROOT / "conf" / group / f"{params['train'][group]}.yaml").is_file()


def train_stage_config(params: dict[str, Any]) -> DictConfig:
    """The config that the train stage of fold 0 composes: dvc.yaml's command with `params` filled in, as DVC does."""
    from hydra import compose, initialize_config_dir

    template = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["do"]["cmd"]
    values = {"item": "0", **flatten(params)}
    command = re.sub(r"\$\{([\w.]+)\}", lambda m: dvc_str(values[m.group(1)]), template)
    overrides = shlex.split(command)[2:]  # after `python train.py`
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}, the names dvc.yaml uses."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def dvc_str(value: Any) -> str:
    """How DVC writes a param into a command: booleans in lower case, everything else as str()."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def sample_params_of_the_makefile() -> dict[str, str]:
    """`-S key=value` of the Makefile's SAMPLE_PARAMS, as `dvc exp run` reads them (Hydra override syntax)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = (ROOT / "Makefile").read_text()
    (definition,) = re.findall(r"^SAMPLE_PARAMS :=((?:.*\\\n)*.*)$", text, flags=re.M)
    words = shlex.split(definition.replace("\\\n", " "))
    settings = [w for flag, w in zip(words, words[1:], strict=False) if flag == "-S"]
    parsed = OverridesParser.create().parse_overrides(settings)
    return {o.key_or_group: o.value() for o in parsed}


CHECKED = ("model.name", "model.weights", "model.freeze_backbone", "data.image_size", "data.num_workers", "n_folds")
CHECKED += ("epochs", "batch_size", "lr", "optimizer._target_", "seed", "split_seed")


def test_params_yaml_is_the_own_data_defaults_of_conf() -> None:
    """`dvc repro` on your own images trains what `python train.py` trains: no sample preset in params.yaml."""
    from hydra import compose, initialize_config_dir

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "experiment" not in params["train"] and "experiment" not in params["train"]["overrides"]
    pipeline = train_stage_config(params)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        plain = compose("config", overrides=["fold=0"])
    assert {k: OmegaConf.select(pipeline, k) for k in CHECKED} == {k: OmegaConf.select(plain, k) for k in CHECKED}


def test_the_makefile_runs_the_pipeline_with_the_sample_settings() -> None:
    """`make demo-pipeline` (dvc exp run -S ...) trains what `python train.py experiment=sample` trains."""
    from hydra import compose, initialize_config_dir

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in sample_params_of_the_makefile().items():
        group, name = key.split(".")
        assert name in params[group], f"-S {key} names no param"
        params[group][name] = value
    pipeline = train_stage_config(params)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        sample = compose("config", overrides=["fold=0", "experiment=sample"])
    assert {k: OmegaConf.select(pipeline, k) for k in CHECKED} == {k: OmegaConf.select(sample, k) for k in CHECKED}


def test_cv_report_refuses_folds_that_do_not_cover_n_folds(tmp_path: Path) -> None:
    from src.cv_report import cv_report
    from src.errors import UserError

    (tmp_path / "runs" / "fold_0").mkdir(parents=True)
    with pytest.raises(UserError, match=r"fold_1.*`folds` must list 0..1"):
        cv_report(tmp_path / "runs", 2, tmp_path / "cv")


def test_mean_history_averages_each_epoch_over_the_folds_that_reached_it() -> None:
    from src.cv_report import mean_history

    short = [{"epoch": 0.0, "val_loss": 1.0}]
    long = [{"epoch": 0.0, "val_loss": 3.0}, {"epoch": 1.0, "val_loss": 2.0, "lr": 0.1}]
    assert mean_history([short, long]) == [{"epoch": 0, "val_loss": 2.0}, {"epoch": 1, "val_loss": 2.0, "lr": 0.1}]


# dvc repro: the whole pipeline on tiny settings


# Your own data's settings (params.yaml, logger: mlflow included) made tiny and offline.
TINY_PARAMS = {
    "folds": [0, 1],
    "train": {
        "n_folds": 2,
        "image_size": 32,
        "epochs": 1,
        "batch_size": 4,
        "overrides": "model.weights=null ++trainer.enable_progress_bar=false ++trainer.enable_model_summary=false "
        "callbacks.rich_progress_bar=null",
    },
    "test": {"batch_size": 8},
}


def tracking_env(repo: Path) -> dict[str, str]:
    """The pipeline's MLflow store: a sqlite file next to the repository, named by the environment as a user would."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{repo.parent / 'mlflow.db'}"}


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    return {
        k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        for k, v in {**base, **update}.items()
    }


@pytest.fixture(scope="module")
def pipeline(data_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the project on tiny data and settings, committed, after one `dvc repro`.

    It keeps the project's .dvc/config, so it also shows that the Drive remote, without a key here,
    does not get in the way of `dvc repro` and `dvc exp run`.
    """
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    shutil.copytree(data_repo, repo)
    for name in PIPELINE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY_PARAMS)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "add", "-A", cwd=repo)
    run("git", "commit", "-qm", "tiny pipeline", cwd=repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["logger"] == "mlflow"  # as shipped
    return repo, run("dvc", "repro", cwd=repo, env=tracking_env(repo)).stdout


def test_dvc_repro_runs_every_stage_and_writes_the_cv_and_test_metrics(pipeline: tuple[Path, str]) -> None:
    repo, out = pipeline
    for stage in ("train@0", "train@1", "cv", "test"):
        assert f"Running stage '{stage}'" in out
    cv = json.loads((repo / "outputs/dvc/cv/metrics.json").read_text())
    per_fold = [cv["fold_0_best_val_accuracy"], cv["fold_1_best_val_accuracy"]]
    assert all(0.0 <= v <= 1.0 for v in per_fold)
    assert cv["cv_mean_val_accuracy"] == pytest.approx(sum(per_fold) / 2)
    assert cv["cv_std_val_accuracy"] == pytest.approx(abs(per_fold[0] - per_fold[1]) / 2)
    assert per_fold[cv["best_fold"]] == max(per_fold)
    test = json.loads((repo / "outputs/dvc/test/test_metrics.json").read_text())
    assert test["n_images"] == 6 and 0.0 <= test["accuracy"] <= 1.0
    import torch

    best = torch.load(repo / "outputs/dvc/cv/best_model.pth", weights_only=True)
    assert best["fold"] == cv["best_fold"] and best["classes"] == ["cat", "dog", "fox"]
    assert best["image_size"] == 32 and best["backbone"] == "resnet18"


def test_dvc_repro_again_has_nothing_to_do(pipeline: tuple[Path, str]) -> None:
    repo, _ = pipeline
    assert json.loads(run("dvc", "status", "--json", cwd=repo).stdout) == {}
    assert "Running stage" not in run("dvc", "repro", cwd=repo, env=tracking_env(repo)).stdout


def test_dvc_repro_tracks_each_fold_and_the_test_in_mlflow(pipeline: tuple[Path, str]) -> None:
    """With the shipped `logger: mlflow`, every train stage is a finished fold run and the test stage a test run."""
    from mlflow import MlflowClient

    from tests.test_tracking import runs_by_type

    repo, _ = pipeline
    client = MlflowClient(tracking_env(repo)["MLFLOW_TRACKING_URI"])
    folds = {r.data.tags["fold"]: r for r in runs_by_type(client, "fold")}
    assert sorted(folds) == ["0", "1"] and {r.info.status for r in folds.values()} == {"FINISHED"}
    cv = json.loads((repo / "outputs/dvc/cv/metrics.json").read_text())
    for k, fold_run in folds.items():
        assert fold_run.data.metrics["best_val_accuracy"] == pytest.approx(cv[f"fold_{k}_best_val_accuracy"])
        assert (
            Path(fold_run.data.tags["hydra_output_dir"]).resolve() == (repo / f"outputs/dvc/train/fold_{k}").resolve()
        )
    test_run = max(runs_by_type(client, "test"), key=lambda r: r.info.start_time)  # `dvc exp run` may add one
    assert test_run.info.status == "FINISHED" and test_run.data.tags["ckpt"] == "outputs/dvc/cv/best_model.pth"
    test = json.loads((repo / "outputs/dvc/test/test_metrics.json").read_text())
    assert test_run.data.metrics["test_accuracy"] == pytest.approx(test["accuracy"])


def test_dvc_metrics_and_plots_show_the_pipeline_results(pipeline: tuple[Path, str]) -> None:
    repo, _ = pipeline
    metrics = json.loads(run("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    (files,) = [revision["data"] for revision in metrics.values()]  # the workspace only
    assert "cv_mean_val_accuracy" in files["outputs/dvc/cv/metrics.json"]["data"]
    assert "accuracy" in files["outputs/dvc/test/test_metrics.json"]["data"]
    plots = json.loads(run("dvc", "plots", "show", "--json", cwd=repo).stdout)
    assert not plots.get("errors"), plots.get("errors")
    assert {"loss", "accuracy", "outputs/dvc/cv/folds/fold_0.csv", "outputs/dvc/cv/folds/fold_1.csv"} <= set(
        plots["data"]
    )
    loss = plots["data"]["loss"][0]["content"]["data"]["values"]
    assert {"train_loss", "val_loss"} <= set().union(*loss) and len(loss) == 2  # one epoch, two series
    assert plots["data"]["outputs/dvc/test/test_confusion_matrix.png"][0]["type"] == "image"


def test_dvc_exp_run_sets_a_param_and_exp_show_lists_it(pipeline: tuple[Path, str]) -> None:
    """A test-only param reruns the test stage alone; the experiment shows its params and metrics."""
    repo, _ = pipeline
    out = run(
        "dvc", "exp", "run", "-n", "small-batch", "-S", "test.batch_size=2", cwd=repo, env=tracking_env(repo)
    ).stdout
    assert "Running stage 'test'" in out and "Running stage 'train" not in out
    shown = json.loads(run("dvc", "exp", "show", "--json", cwd=repo).stdout)
    experiments = [rev for entry in shown for exp in entry.get("experiments") or [] for rev in exp["revs"]]
    (exp,) = [e for e in experiments if e.get("name") == "small-batch"]
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["test"]["batch_size"] == 2 and params["train"]["n_folds"] == 2
    assert "accuracy" in exp["data"]["metrics"]["outputs/dvc/test/test_metrics.json"]["data"]
    assert "cv_mean_val_accuracy" in exp["data"]["metrics"]["outputs/dvc/cv/metrics.json"]["data"]
