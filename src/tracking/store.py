"""The MLflow store: which URI, one client per URI, a lock for parallel jobs, a new sqlite store made from a copy,
and credentials kept out of sight."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src import files
from src.errors import UserError

log = logging.getLogger(__name__)

# `scheme://user:secret@host` -> `scheme://user:***@host`; also a bare `scheme://token@host`, and the
# escaped form Hydra writes into a sweep's override files (`http\://user\:secret@host`).
_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*\\?://)(?P<user>[^:/@\s\\]+)(?:(?P<sep>\\?:)(?P<secret>[^@/\s]*))?@"
)


def redact(text: str) -> str:
    """Hide the password (or token) of every URI in `text`; the user name and host stay readable."""

    def hide(match: re.Match[str]) -> str:
        if match.group("secret") is None:  # https://token@host: the user part is the secret
            return f"{match.group('scheme')}***@"
        return f"{match.group('scheme')}{match.group('user')}{match.group('sep')}***@"

    return _CREDENTIALS.sub(hide, text)


class RedactingFilter(logging.Filter):
    """A logging filter (wired into Hydra's job and launcher logging) that redacts URIs with credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db as an absolute path (Hydra's output folders
    must not each get a store of their own)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    """`logger.tracking_uri`, else the default above."""
    return OmegaConf.select(cfg, "logger.tracking_uri") or default_tracking_uri()


def use(uri: str) -> None:
    """Point MLflow's fluent API (log_model, register_model, artifacts) at `uri`."""
    import mlflow

    _hide_urls_with_credentials(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def _hide_urls_with_credentials(uri: str) -> None:
    """MLflow prints "View run ... at: <uri>" when a run ends; with credentials in the URI it must not. Its
    download progress bars, meant for a terminal, went into the jobs' logs and before error lines: off unless
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR says otherwise."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


@functools.cache
def client(uri: str) -> Any:
    """One client per store. Creating it creates a new sqlite store's tables, so parallel jobs take turns."""
    from mlflow import MlflowClient

    _hide_urls_with_credentials(uri)
    with store_lock(uri):
        seed_sqlite_store(uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def seed_sqlite_store(uri: str) -> None:
    """Give a new sqlite store MLflow's tables as a copy of an empty store, not by running MLflow's migrations.

    MLflow builds a new store's schema by running its migrations one by one (68 in MLflow 3.17): ~1.1 s on 2 CPU
    cores for every new store (a fresh clone's first run, every test). The empty store is made by MLflow itself
    once per MLflow and SQLAlchemy version, in the user's cache folder, less its Default experiment, whose
    artifact folder depends on where a store is made: MLflow adds that experiment when it opens the copy, as it
    does in a store it made. Any failure leaves the store for MLflow to make as before; an existing file is never
    touched, and an empty store that fails its check is made again next time.
    """
    import shutil

    database = sqlite_file(uri)
    if database is None or "?" in uri or database.exists() or not database.parent.is_dir():
        return  # with query parameters (`?timeout=20`), the file name is SQLAlchemy's to parse
    tmp = files.temporary_name(database)
    try:
        empty = _empty_store()
        shutil.copyfile(empty, tmp)
        if not _is_empty_store(tmp):
            empty.unlink(missing_ok=True)
            raise ValueError(f"{empty} is not an empty MLflow store; removed")
        os.link(tmp, database)  # fails, leaving it, if a store appeared meanwhile
    except Exception as err:  # noqa: BLE001 - an optimisation: MLflow makes the store itself
        log.debug("sqlite store %s left for MLflow to make: %s", database, err)
    finally:
        tmp.unlink(missing_ok=True)


def _is_empty_store(path: Path) -> bool:
    """A sqlite file with MLflow's schema version and tables and no experiment, as _empty_store writes it."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path)) as db:
            versions = db.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
            return versions == 1 and db.execute("SELECT count(*) FROM experiments").fetchone()[0] == 0
    except sqlite3.Error:
        return False


def _empty_store() -> Path:
    """MLflow's tables without any experiment, made by MLflow on first use (see seed_sqlite_store)."""
    import shutil
    import sqlite3
    import tempfile

    import mlflow
    import sqlalchemy
    from mlflow import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-classification"
    path = cache / "mlflow-stores" / f"empty-mlflow-{mlflow.__version__}-sqlalchemy-{sqlalchemy.__version__}.db"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        made = Path(tmp) / "mlflow.db"
        MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)
        with contextlib.closing(sqlite3.connect(made)) as db, db:
            db.execute("DELETE FROM experiment_tags")
            db.execute("DELETE FROM experiments")
        shutil.copyfile(made, made.with_name("empty.db"))  # MLflow's engine may still hold mlflow.db open
        os.replace(made.with_name("empty.db"), path)
    return path


def check_reachable(uri: str) -> None:
    """Fail before any training when an HTTP tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise UserError(
            f"MLflow tracking server {redact(uri)} is not reachable ({type(err).__name__}); start it with "
            f"`mlflow server --backend-store-uri sqlite:///mlflow.db --artifacts-destination ./mlartifacts "
            f"--host 127.0.0.1 --port 5000`, or run with logger=none"
        ) from err


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store (relative to the working folder unless absolute), else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def lock_path(uri: str) -> Path:
    """Next to a sqlite database; for any other store in a per-user folder no other user can hold."""
    database = sqlite_file(uri)
    if database is not None:
        return database.with_name(database.name + ".lock")
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "image-classification" / "locks"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base / f"mlflow-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@functools.cache
def _file_lock(path: str) -> Any:
    """One lock object per file: it is re-entrant, so code holding the lock may call code that takes it."""
    from filelock import FileLock

    return FileLock(path, timeout=600)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates parents, writes summaries and moves aliases in a store.

    Parallel jobs on one machine (joblib launcher, several shells) share the lock file.
    """
    with _file_lock(str(lock_path(uri))):
        yield


def default_artifact_location(uri: str, name: str) -> str | None:
    """For a sqlite store, `<folder of the database>/mlruns/<name>`: MLflow's own default is `./mlruns` under
    whatever folder the first run started from, so a store reached from elsewhere scattered its artifacts."""
    database = sqlite_file(uri)
    if database is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"
    return (database.resolve().parent / "mlruns" / slug).as_uri()


def experiment_id(mlflow_client: Any, name: str) -> str:
    """The id of experiment `name`, created on first use (artifacts beside a sqlite database)."""
    from mlflow.exceptions import MlflowException

    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = default_artifact_location(mlflow_client.tracking_uri, name)
            return mlflow_client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by a parallel job in the meantime
            experiment = mlflow_client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
            f"or pick another logger.experiment_name"
        )
    return experiment.experiment_id


def local_dir(artifact_uri: str) -> Path | None:
    """The folder behind an artifact location when it is on this machine's file system (file: or a plain path)."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" or (not parsed.scheme and artifact_uri.startswith("/")):
        return Path(unquote(parsed.path))
    return None


def _link_in_place(source: Path, path: Path) -> bool:
    """Make `path` a hard link to `source` (src.files.link: never renamed over, which spares the next commit of
    MLflow's sqlite store a wait for ext4 to write out the 45 MB model, ~20 ms measured); where no link can be
    made (across file systems), `path` is left as it was and the answer is False."""
    try:
        files.link(source, path)
    except OSError:
        return False
    return True


def log_linked(repository: Any, path: Path, artifact_path: str) -> None:
    """Log `path` as `<artifact_path>/<name>` through an MLflow artifact repository; in a local artifact store as
    a hard link to it (MLflow leaves a file that is already in place, so a 45 MB network is not copied); elsewhere
    it is uploaded as usual."""
    root = local_dir(repository.artifact_uri)
    if root is not None:
        target = root / artifact_path / path.name
        with contextlib.suppress(OSError):
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_in_place(path, target)
    repository.log_artifact(str(path), artifact_path)


@contextlib.contextmanager
def downloaded(ref: str, uri: str) -> Iterator[Path]:
    """The files behind a `models:/` or `runs:/` reference as a local path: used in place from a local artifact
    store; from a remote one (an `mlflow server`, S3) downloaded into a temporary folder that goes when the block
    ends. MLflow's own download into a new temporary folder is never deleted: a 5-fold ResNet18 ensemble left
    225 MB in /tmp per test.py or predict.py run."""
    import tempfile

    import mlflow
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if ref.startswith("models:/"):
        underlying = ModelsArtifactRepository.get_underlying_uri(ref)
    else:
        underlying = RunsArtifactRepository.get_underlying_uri(ref, tracking_uri=uri)
    local = local_dir(underlying)
    if local is not None and local.exists():
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        yield Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=tmp, tracking_uri=uri))


def link_members(artifact_uri: str, sources: list[Path]) -> int:
    """Make the network files inside a logged fold ensemble hard links to `sources`, and return how many: MLflow
    copies each one, which would keep a fold's 45 MB network up to four times (run folder, `exported/`, the fold
    model, the ensemble). Member i of the model's ensemble.json is the copy of sources[i], so nothing is compared;
    its name and size are checked. Model files are replaced, never written in place, so the files stay independent
    in effect; across file systems (or on a remote store) the copies stay."""
    import json

    from src.serving.ensemble_model import CONFIG_FILE
    from src.serving.mlflow_model import ensemble_dir

    root = local_dir(artifact_uri)
    folder = ensemble_dir(root) if root is not None and root.is_dir() else None
    if folder is None:
        return 0
    members = json.loads((folder / CONFIG_FILE).read_text())["models"]
    linked = 0
    for member, source in zip(members, sources, strict=False):
        target = folder / member["file"]
        same = member.get("source") == source.name and target.is_file()
        if same and target.stat().st_size == source.stat().st_size and not target.samefile(source):
            linked += _link_in_place(source, target)
    return linked
