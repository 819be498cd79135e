"""Which data a run saw: the md5 that `data.dvc` records, else a digest of the image bytes, and the
split; shown in MLflow's Datasets column and part of a configuration's identity."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def dvc_data_version(data_dir: str | Path, dvc_file: str | Path = "data.dvc") -> dict[str, str]:
    """The md5 that `data.dvc` records for the data folder, and whether the workspace still matches it.

    Empty when `data_dir` is not inside the DVC-tracked folder.
    """
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        return {}
    import yaml

    out = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [{}])[0]
    tracked = (dvc_file.parent / out.get("path", "")).resolve()
    if "md5" not in out or not Path(data_dir).resolve().is_relative_to(tracked):
        return {}
    tags = {"data_version": out["md5"], "data_dvc_file": str(dvc_file)}
    try:
        from dvc.repo import Repo

        with Repo(str(dvc_file.parent)) as repo:
            changed = bool(repo.status(targets=[str(dvc_file)]))
    except Exception as err:  # no DVC repo, broken cache: the md5 is still worth recording
        log.warning("could not compare %s with %s: %s", tracked, dvc_file, err)
        tags["data_matches_dvc"] = "unknown"
        return tags
    tags["data_matches_dvc"] = str(not changed).lower()
    if changed:
        log.warning(
            "%s differs from %s (md5 %s): run `dvc add %s` to version the change, or `dvc checkout` to restore it",
            tracked,
            dvc_file,
            out["md5"],
            out.get("path"),
        )
    return tags


def content_digest(root: Path, paths: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 over every (relative path, class, file bytes): the data's identity without DVC."""
    from src import file_memo

    h = hashlib.sha256()
    for path, label in sorted(zip(paths, labels, strict=True)):
        h.update(f"{path}\0{label}\0".encode())
        h.update(bytes.fromhex(file_memo.sha256(Path(root) / path)))
    return f"sha256:{h.hexdigest()[:32]}"


def split_digest(rows: Sequence[dict[str, Any]]) -> str:
    """Digest of the (path, class, fold) rows: two runs compare like with like only when it agrees."""
    return hashlib.sha256(json.dumps(sorted(map(tuple, (r.values() for r in rows)))).encode()).hexdigest()[:16]


def training_data(root: Path, paths: Sequence[str], labels: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict:
    """Tags (and identity items) for the training data of a fold run.

    `data_version` is the DVC md5 while the workspace matches `data.dvc`, else the content digest,
    so a fold re-run after the data changed never joins the old CV mean.
    """
    tags = dvc_data_version(root)
    if tags.get("data_matches_dvc") != "true":
        tags["data_version"] = content_digest(root, paths, labels)
    tags["split_digest"] = split_digest(rows)
    return tags


def log_dataset(mlflow_client: Any, run_id: str, source: Path, version: str, context: str, name: str) -> None:
    """Show the data in the MLflow UI's Datasets column: digest = data version, source = the data folder."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = LocalArtifactDatasetSource(str(Path(source).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=version.removeprefix("sha256:")[:36])
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    mlflow_client.log_inputs(run_id, datasets=[entity])
