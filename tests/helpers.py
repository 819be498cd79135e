"""Test-only parts that the CLI under test loads by name (Hydra `_target_`), and a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import requests


class CrashAfterFirstEpoch(L.Callback):
    """Raises in the middle of a fold (after its first epoch) when `fold` equals `crash_fold`."""

    def __init__(self, fold: int, crash_fold: int = 0) -> None:
        self.crash = fold == crash_fold

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.crash:
            raise RuntimeError("injected crash in the middle of a fold")


class SignalAfterFirstEpoch(L.Callback):
    """Sends this process `signum` once the first epoch (and its checkpoint) is done, as Ctrl-C (SIGINT)
    or a scheduler (SIGTERM) would. A run resumed from a checkpoint is left alone: the callback is part of the
    configuration, so resuming the same configuration keeps it."""

    def __init__(self, signum: str = "SIGTERM") -> None:
        self.signum = getattr(signal, signum)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1 and trainer.ckpt_path is None:
            os.kill(os.getpid(), self.signum)
            time.sleep(5)  # the signal arrives while the fold is still running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port with a sqlite backend and proxied artifacts; stopped on exit."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
