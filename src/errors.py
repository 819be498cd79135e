"""Bad input: one exception type that Hydra prints as a single line, without a traceback; the job wrapper of
every entry point."""

from __future__ import annotations

import atexit
import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)


class UserError(CompactHydraException):
    """Bad input the user can fix; the message says how."""


def run_job(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """Run one Hydra job and turn bad input into one line on stderr.

    A single run exits with status 2. In a sweep the error is logged when it happens and
    re-raised, so Hydra goes on with the next job and reports the failure at the end.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    _skip_exit_collection()
    try:
        return fn(cfg)
    except UserError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("error: %s", err)
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _skip_exit_collection() -> None:
    """Spare the process ~1 s at exit: with torch, torchvision and Lightning loaded, the interpreter's last
    garbage collection walks millions of objects it is about to free anyway.

    gc.freeze() at exit takes them out of that collection. Objects are still freed by reference counting,
    and atexit handlers (loggers, MLflow, weakref finalizers) run as before; only __del__ of objects caught in
    reference cycles is skipped, which Python never promises at exit.
    """
    if not getattr(_skip_exit_collection, "registered", False):
        atexit.register(gc.freeze)
        _skip_exit_collection.registered = True  # type: ignore[attr-defined]
