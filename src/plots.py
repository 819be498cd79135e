"""PNG figures: confusion matrices and training curves, drawn now or in a helper process.

matplotlib draws in Python, about 0.3 s for a fold's three figures: in a sweep on cached features that was the
largest fixed cost of a job. `later` hands a figure to one helper process per training process (started with
`spawn`, so it imports matplotlib and numpy, not torch: by `start_helper` while train.py imports, else on first
use) which draws it on another core while the job goes on and the next one starts. `wait` returns once the
files are written; it runs before the files are logged to MLflow, at a job's end in a launcher's worker
process (`settle`), and, for whatever is still pending, when the process exits. Where no helper can start (a
daemonic process, a loky worker, a broken pool), figures are drawn at once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


# Fonts with the CJK scripts that DejaVu Sans lacks, where installed (e.g. the fonts-noto-cjk package).
FALLBACK_FONTS = (
    "Noto Sans CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK TC",
    "Noto Sans CJK KR",
    "Source Han Sans",
    "WenQuanYi Zen Hei",
    "Microsoft YaHei",
    "Malgun Gothic",
    "Arial Unicode MS",
)
_covered: set[int] | None = None  # code points the chosen fonts can draw
_reported: set[str] = set()


def use_fonts(texts: Sequence[str] = ()) -> None:
    """Class names in any script: matplotlib falls back glyph by glyph to an installed font from FALLBACK_FONTS.
    Characters that no installed font has are drawn as boxes; that is said once per process, naming them,
    instead of matplotlib's warning per glyph and figure."""
    global _covered
    if _covered is None:
        import warnings

        import matplotlib
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        installed = {font.name for font in font_manager.fontManager.ttflist}
        families = ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]
        matplotlib.rcParams["font.family"] = families
        _covered = set()
        for family in families:
            with contextlib.suppress(Exception):  # a font file matplotlib cannot open covers nothing
                _covered.update(FT2Font(font_manager.findfont(family, fallback_to_default=False)).get_charmap())
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
    missing = sorted({c for text in texts for c in text if not c.isspace() and ord(c) not in _covered} - _reported)
    if missing:
        _reported.update(missing)
        log.warning(
            "no installed font draws %s (shown as boxes in the figures); install one, e.g. the fonts-noto-cjk package",
            " ".join(missing),
        )


def _cell_inches(n: int) -> float:
    """The side of one matrix cell: room for counts up to 50 classes, then just for a tick label."""
    return 0.5 if n <= 20 else 0.3 if n <= 50 else 0.2


def confusion_matrix_figure(counts: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted), sized to the number of classes.

    Each class gets a cell of fixed size and tick labels in a font whose line fits that cell; column labels
    stand vertically, so long names never run into each other, and the margins are measured from the
    rendered labels, so all of them lie inside the figure. Counts are written in the cells up to 30
    classes; beyond that a colour bar reads them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    use_fonts(classes)
    n = len(classes)
    cell = _cell_inches(n)
    font = min(10.0, cell * 72 * 0.6)
    side = max(2.0, n * cell)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest", vmin=0)
    ax.set_xticks(range(n), list(classes), rotation=90, fontsize=font)
    ax.set_yticks(range(n), list(classes), fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, y=1.0)  # nothing above the matrix: a fixed place spares matplotlib's search for one
    colorbar = None
    if n > 30:
        colorbar = fig.add_axes((0.0, 0.0, 0.01, 1.0))
        fig.colorbar(image, cax=colorbar)
    _fit_margins(fig, ax, colorbar, side)
    if n <= 30:  # inside the cells: after the margins, which they never change (measuring them took ~15% of a figure)
        threshold = counts.max() / 2 if counts.size else 0
        for i, j in np.ndindex(counts.shape):
            color = "white" if counts[i, j] > threshold else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=0.8 * font, color=color)
    return fig


def _fit_margins(fig: Figure, ax: Axes, colorbar: Axes | None, side: float, pad: float = 0.1) -> None:
    """Size the figure to a `side`-inch square of cells plus what its labels, title and colour bar need.

    Text sizes are in points, so the margins measured once hold at the final figure size.
    """
    renderer = fig.canvas.get_renderer()
    inner, outer = ax.get_window_extent(renderer), ax.get_tightbbox(renderer)
    left, bottom = (inner.x0 - outer.x0) / fig.dpi + pad, (inner.y0 - outer.y0) / fig.dpi + pad
    right, top = (outer.x1 - inner.x1) / fig.dpi + pad, (outer.y1 - inner.y1) / fig.dpi + pad
    gap, bar = 0.15, 0.2
    if colorbar is not None:
        bar_labels = (colorbar.get_tightbbox(renderer).x1 - colorbar.get_window_extent(renderer).x1) / fig.dpi
        right = max(right, gap + bar + bar_labels + pad)
    width, height = left + side + right, bottom + side + top
    fig.set_size_inches(width, height)
    ax.set_position((left / width, bottom / height, side / width, side / height))
    if colorbar is not None:
        colorbar.set_position(((left + side + gap) / width, bottom / height, bar / width, side / height))


def save_confusion_matrix(counts: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix of `counts` as a PNG (layout: `confusion_matrix_figure`)."""
    confusion_matrix_figure(counts, classes, title).savefig(path, dpi=100)
    return Path(path)


def curve_paths(path_prefix: Path) -> dict[str, Path]:
    """The files `save_curves` writes, by metric."""
    return {metric: Path(f"{path_prefix}_{metric}.png") for metric in ("loss", "accuracy")}


def save_curves(history: Sequence[dict[str, float]], path_prefix: Path) -> list[Path]:
    """Loss and accuracy per epoch, train vs validation: `<prefix>_loss.png`, `<prefix>_accuracy.png`.

    Figures of their own with fixed margins: no pyplot state, and no layout pass before the drawing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    for metric, path in curve_paths(path_prefix).items():
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0.12, 0.12, 0.84, 0.84))
        for stage in ("train", "val"):
            key = f"{stage}_{metric}"
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if row.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=stage)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs (and half the ticks to draw)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.savefig(path, dpi=100)
    return list(curve_paths(path_prefix).values())


_helper: ProcessPoolExecutor | None = None
_pending: dict[Future, tuple[Callable[..., Any], tuple[Any, ...]]] = {}


def _executor() -> ProcessPoolExecutor | None:
    """The helper process's pool, started on first use; None where this process may not start one."""
    global _helper
    # A spawned child takes over its parent's start method: inside joblib's loky workers ("loky") it cannot start.
    method = multiprocessing.get_start_method(allow_none=True)
    usable = method in (None, "fork", "spawn", "forkserver") and not multiprocessing.current_process().daemon
    if _helper is None and usable:
        _helper = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_helper_init)
        atexit.register(wait)
    return _helper


def _helper_init() -> None:
    """The helper's warnings (a class name no font draws) in the console format of Hydra's jobs; they reach the
    console, not the job's log file, which belongs to the training process. Its exit skips the interpreter's
    teardown of matplotlib and numpy (~0.25 s that the training process waited for at its own exit): every figure
    is written and closed by then, and results go back through a pipe written synchronously."""
    logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=logging.WARNING)
    atexit.register(_exit_now)


def _exit_now() -> None:
    logging.shutdown()
    os._exit(0)


def _load_matplotlib() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from matplotlib.figure import Figure  # noqa: F401


def start_helper() -> None:
    """Start the helper now and have it import matplotlib: called before a training process's own imports,
    which leave the other cores idle, its ~0.5 s start-up costs nothing there. Started at the first figure
    instead, it took a core from the next job, and a single run waited for it at exit."""
    executor = _executor()
    if executor is not None:
        with contextlib.suppress(RuntimeError):  # a broken pool: figures are drawn at once
            executor.submit(_load_matplotlib)


def later(draw: Callable[..., Any], *args: Any) -> Future:
    """Draw `draw(*args)` (a function of this module) in the helper process; at once where there is none."""
    executor = _executor()
    if executor is not None:
        try:
            future = executor.submit(draw, *args)
        except RuntimeError:  # BrokenProcessPool, or a pool already shut down at exit
            pass
        else:
            _pending[future] = (draw, args)
            return future
    future = Future()
    future.set_result(draw(*args))
    return future


def settle(futures: Sequence[Future]) -> None:
    """At a job's end: wait in a launcher's worker process (joblib's loky workers), which its pool may end without
    running exit hooks; elsewhere let the figures draw while the next job starts (the exit hook waits for them)."""
    if multiprocessing.parent_process() is not None:
        wait(futures)


def wait(futures: Sequence[Future] | None = None) -> None:
    """Return once `futures` (default: every figure still pending) are written; each is settled once. A figure the
    helper could not draw (it died, say) is drawn here instead, so a real error in the drawing code is raised here."""
    for future in [f for f in (_pending if futures is None else futures) if f in _pending]:
        draw, args = _pending.pop(future)
        try:
            future.result()
        except Exception as err:
            log.debug("drawing %s here: the helper process failed (%s)", draw.__name__, err)
            draw(*args)
