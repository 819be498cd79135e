"""The fixed costs of an entry point's process that no library setting removes: Python's cyclic garbage
collector walking the millions of objects that torch, torchvision and Lightning create when imported, and the
start-up of the figure helper process, which goes on the core those imports leave idle, and Hydra composing each
sweep job's config twice.

Measured on 2 CPU cores: of the ~4.3 s a sweep spent importing them, ~1 s was full collections triggered by the
imports themselves (each walks every object created so far), and the interpreter's last collection at exit took
another ~1 s (benchmarks/README.md).
"""

from __future__ import annotations

import atexit
import copy
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_imported = False


@contextmanager
def heavy_imports() -> Iterator[None]:
    """Run an entry point's heavy imports with the collector off, then freeze what they created.

    Frozen objects (modules, classes, functions: alive until exit anyway) are left out of every later
    collection, so those a training job triggers walk only its own objects. The few cycles of garbage made
    during the imports stay in memory. Only the first call per process does this: a later job finds its imports
    loaded, and freezing then would keep the previous job's uncollected garbage for good.

    It also freezes everything at exit, which spares the interpreter's final collection over objects about to be
    freed anyway. They are still freed by reference counting, and atexit handlers (loggers, MLflow, weakref
    finalizers) run as before; only __del__ of objects caught in reference cycles is skipped, which Python never
    promises at exit.
    """
    global _imported
    if _imported:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
        atexit.register(gc.freeze)
        _imported = True


def start_plot_helper() -> None:
    """Start src.plots' helper process before the heavy imports, on a core they leave idle; not in the extra
    processes of a DDP run (LOCAL_RANK > 0), which draw nothing."""
    if _imported or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    from src import plots

    plots.start_helper()


@contextmanager
def compose_each_job_once() -> Iterator[None]:
    """Compose each sweep job's config once, not twice.

    Hydra's sweeper composes every job of a batch before the first one starts, to fail early on an override that
    does not compose (`Sweeper.validate_batch_is_legal`); the launcher then composes each job again as it starts
    it: ~0.13 s per compose of conf/ on 2 CPU cores, so a 5-fold sweep spent ~1.3 s composing. Inside this block
    the launcher gets the config composed for that check, with the sweep's resolver cache copied again as
    Hydra's own compose does, and it is let go then. A job nobody checked (an Optuna trial) is composed as before,
    and so are jobs that launchers compose in their own processes (joblib, submitit).
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.plugins.sweeper import Sweeper
    from omegaconf import OmegaConf

    load, validate = ConfigLoaderImpl.load_sweep_config, Sweeper.validate_batch_is_legal
    checked: dict[tuple[int, tuple[str, ...]], Any] = {}
    checking = False

    def validate_batch_is_legal(self: Sweeper, batch: Any) -> None:
        nonlocal checking
        checking = True
        try:
            validate(self, batch)
        finally:
            checking = False

    def load_sweep_config(self: ConfigLoaderImpl, master_config: Any, sweep_overrides: list[str]) -> Any:
        key = (id(master_config), tuple(sweep_overrides))
        if checking:
            checked[key] = load(self, master_config, sweep_overrides)
            return copy.deepcopy(checked[key])
        config = checked.pop(key, None)
        if config is None:
            return load(self, master_config, sweep_overrides)
        OmegaConf.copy_cache(from_config=master_config, to_config=config)
        return config

    ConfigLoaderImpl.load_sweep_config = load_sweep_config  # type: ignore[method-assign]
    Sweeper.validate_batch_is_legal = validate_batch_is_legal  # type: ignore[method-assign]
    try:
        yield
    finally:
        ConfigLoaderImpl.load_sweep_config = load  # type: ignore[method-assign]
        Sweeper.validate_batch_is_legal = validate  # type: ignore[method-assign]
