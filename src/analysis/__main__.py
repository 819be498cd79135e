"""python -m src.analysis <parent run id | models:/<name>@<alias> | multirun folder> [--out DIR] [--tracking-uri URI]

Writes the error-analysis report (src.analysis.report) of a configuration and prints the path of its index.html.
A parent run id reads the parent's `oof/oof_predictions.csv`, the latest finished run of each fold's `exported/`
model file and the training folder from its `data.train_dir` param. A multirun folder gives one report per
configuration found in it (src.analysis.inputs). Bad input prints one `error: ...` line and exits with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from src.analysis.inputs import distinguishing_names, sweep_configurations
from src.analysis.report import write_report
from src.errors import UserError

PARENT_TAG = "mlflow.parentRunId"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the framework's default store, in the folder you run from


def _download(run_id: str, artifact: str, dst: Path, uri: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(dst), tracking_uri=uri
            )
        )
    except (MlflowException, OSError) as err:
        raise UserError(f"run {run_id} has no artifact {artifact} ({str(err).splitlines()[0]})") from None


def _latest_folds(client: Any, parent: Any) -> dict[int, Any]:
    """The latest FINISHED child run of each fold (a re-run replaces the earlier one; failed runs never count)."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.end_time ASC"],
        max_results=10000,
    )
    return {int(c.data.tags["fold"]): c for c in children if c.info.status == "FINISHED" and "fold" in c.data.tags}


def _train_dir(run: Any, tmp: Path, uri: str) -> Path:
    """The fold run's data.train_dir; a relative one is taken from the folder its job was launched in, which
    Hydra recorded in the run's `config/hydra.yaml` (else the current folder)."""
    from omegaconf import OmegaConf

    value = run.data.params.get("data.train_dir")
    if not value:
        raise UserError(f"fold run {run.info.run_id} has no data.train_dir param; pass --image-root")
    train_dir = Path(value)
    if train_dir.is_absolute():
        return train_dir
    try:
        hydra_file = _download(run.info.run_id, "config/hydra.yaml", tmp / "config", uri)
        cwd = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.cwd")
    except UserError:
        cwd = None
    return Path(cwd or ".") / train_dir


def from_run(run_id: str, uri: str, out: Path, image_root: Path | None) -> list[Path]:
    """Report on the parent run `run_id` of a complete configuration."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri}; pass --tracking-uri (or a multirun folder)")
    client = MlflowClient(tracking_uri=uri)
    try:
        parent = client.get_run(run_id)
    except MlflowException as err:
        raise UserError(f"no run {run_id} in {uri} ({str(err).splitlines()[0]}); pass --tracking-uri") from None
    if PARENT_TAG in parent.data.tags:
        raise UserError(f"run {run_id} is a fold run; pass its parent run {parent.data.tags[PARENT_TAG]}")
    folds = _latest_folds(client, parent)
    if not folds:
        raise UserError(f"run {run_id} has no finished fold runs; pass the parent run of a cross-validated config")
    with tempfile.TemporaryDirectory() as tmp:
        oof_csv = _download(run_id, "oof/oof_predictions.csv", Path(tmp) / "oof", uri)
        model_files = {}
        for fold, run in folds.items():
            exported = sorted(_download(run.info.run_id, "exported", Path(tmp) / f"fold_{fold}", uri).glob("*.pth"))
            if not exported:
                raise UserError(f"fold {fold} run {run.info.run_id} has no exported/*.pth model file")
            model_files[fold] = exported[-1]
        root = image_root or _train_dir(folds[min(folds)], Path(tmp), uri)
        write_report(oof_csv, model_files, root, out)
    return [out / "index.html"]


def from_sweep(folder: Path, out: Path, image_root: Path | None) -> list[Path]:
    """Report on every configuration of a multirun folder, in out/<what sets it apart> when there are several."""
    configurations = sweep_configurations(folder)
    names = distinguishing_names(configurations)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, name in zip(configurations, names, strict=True):
            target = out if len(configurations) == 1 else out / name
            oof_csv = config.write_oof(Path(tmp) / f"{len(written)}.csv")
            write_report(oof_csv, config.model_files, image_root or config.image_root, target)
            written.append(target / "index.html")
    return written


def _registered_run(ref: str, uri: str) -> str:
    """The run behind `models:/<name>@<alias>` or `models:/<name>/<version>`: for a fold ensemble, its parent."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, _, version = ref.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise UserError(f"{ref} is not in the registry at {uri} ({str(err).splitlines()[0]})") from None
    return mv.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.analysis", description=__doc__.splitlines()[2])
    parser.add_argument(
        "source", help="parent run id, models:/<name>@<alias> (a fold ensemble), or a multirun/<date>/<time> folder"
    )
    parser.add_argument("--out", type=Path, help="report folder (default analysis/<run id or sweep>)")
    parser.add_argument(
        "--tracking-uri", help=f"MLflow store (default $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})"
    )
    parser.add_argument("--image-root", type=Path, help="training image folder, if it moved since training")
    args = parser.parse_args(argv)
    folder = Path(args.source)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per report, no bars
    try:
        if folder.is_dir():
            resolved = folder.resolve()
            out = args.out or Path("analysis") / f"{resolved.parent.name}_{resolved.name}"
            written = from_sweep(folder, out, args.image_root)
        elif args.source.startswith("models:/"):
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
            run_id = _registered_run(args.source, uri)
            written = from_run(run_id, uri, args.out or Path("analysis") / run_id, args.image_root)
        elif folder.exists() or "/" in args.source:
            raise UserError(f"{args.source} is not a folder; pass a multirun/<date>/<time> folder or a parent run id")
        else:
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
            written = from_run(args.source, uri, args.out or Path("analysis") / args.source, args.image_root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
