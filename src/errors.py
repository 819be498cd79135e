"""Bad input: one exception type that Hydra prints as a single line, without a traceback; warnings about input
said once per sweep."""

from __future__ import annotations

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

    try:
        return fn(cfg)
    except UserError as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("error: %s", err)
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def positive_number(name: str, value: Any, integer: bool = False, other: str = "") -> Any:
    """`value` of setting `name` as a number > 0 (a whole one with `integer`), else a UserError that says so
    (`other`: what else the setting takes): PyTorch's own errors for these come from deep inside a DataLoader or
    optimizer."""
    said = f"{name}={value} must be {'a whole number' if integer else 'a number'} > 0{other}"
    try:
        number = int(value) if integer and float(value) == int(value) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(said) from None
    if isinstance(value, bool) or (integer and not isinstance(number, int)) or not 0 < number < float("inf"):
        raise UserError(said)
    return number


def check_overrides(argv: list[str]) -> None:
    """Stop with one line, saying how to quote it, at a command-line override Hydra's grammar cannot read: a value
    with letters outside ASCII (`café`), or with `=` (a sweep job's folder, `.../fold=0,lr=0.001/...`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv[1:]:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parser.parse_override(arg)
        except Exception:  # Hydra's parse errors, whatever their type
            key, _, value = arg.partition("=")
            print(
                f"error: Hydra cannot read {arg}: quote the value, e.g. '{key}=\"{value}\"' (the outer single quotes "
                f"are for the shell)",
                file=sys.stderr,
            )
            raise SystemExit(2) from None


_warned: set[str] = set()


def warn_once(logger: logging.Logger, message: str, key: str | None = None) -> None:
    """A warning the first time this process logs `message` (or one with the same `key`, for messages that name
    a job's own file), information after that: the jobs of a sweep that run in one process find the same skipped
    files or duplicates, which is worth one warning, not one per fold; each job's own log still records it."""
    key = message if key is None else key
    logger.log(logging.INFO if key in _warned else logging.WARNING, message)
    _warned.add(key)
