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
            if self.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                # Started from a background job of a non-interactive shell (`make test &`), this process inherited
                # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: give it the one a
                # terminal's Ctrl-C meets.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), self.signum)
            time.sleep(5)  # the signal arrives while the fold is still running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    command: list[str], health: str, log_path: Path, timeout: float, cwd: Path | None = None, env: dict | None = None
) -> Iterator[str]:
    """Run a server `command` (given --host/--port here) on a free 127.0.0.1 port until `health` answers;
    yield its URL and end its whole process group on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}{health}", timeout=2).ok:
                        break
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command[:3])} did not start: {log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """`mlflow server` with a sqlite backend and proxied artifacts; stopped on exit. Its store is seeded as
    train.py seeds a new one (src.tracking.store.seed_sqlite_store), which spares the server's start ~1 s."""
    from src.tracking.store import seed_sqlite_store

    seed_sqlite_store(f"sqlite:///{root / 'server.db'}")
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "mlartifacts"),
        "--workers",
        "1",
    ]
    with serve(command, "/health", root / "server.log", timeout=90) as url:
        yield url
