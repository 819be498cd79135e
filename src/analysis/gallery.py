"""Thumbnail grids: images with a caption each, readable at any count and with long class names."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from src import plots
from src.errors import UserError

CELL_INCHES = 2.4  # width of one thumbnail with its margins; its height adds the caption's lines
PAD_INCHES = 0.1
LINE_INCHES = 0.16  # one caption line at 8 pt
MAX_COLUMNS = 8
DPI = 100
CAPTION_GAP_INCHES = 0.04  # between an image and its caption
PNG_COMPRESSION = 1  # zlib's default 6 makes a photo gallery ~20% smaller and takes ~3.5x as long to write
NAME_WIDTH = 26  # characters of a class name per caption line at the caption's font size


def short_name(name: str, width: int = NAME_WIDTH, lines: int = 2) -> str:
    """A class name wrapped onto at most `lines` lines; a longer one keeps its start and its end (where names
    such as `..._left` and `..._right` differ) around an ellipsis."""
    wrapped = textwrap.wrap(name, width, break_long_words=True) or [name]
    if len(wrapped) <= lines:
        return "\n".join(wrapped)
    return "\n".join([*wrapped[: lines - 1], "…" + name[-(width - 1) :].lstrip()])


def thumbnail(path: Path, size: int = 224) -> np.ndarray:
    """The image file as RGB floats in [0, 1], shrunk to at most `size` pixels a side."""
    from src.serving.ensemble_model import load_image

    try:
        image = load_image(path)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist; point the analysis at the training image folder") from None
    image.thumbnail((size, size))
    return np.asarray(image, dtype=np.float32) / 255.0


def fit_square(image: np.ndarray, side: int) -> np.ndarray:
    """The image as uint8 RGB scaled to fit a `side`-pixel square (small images enlarged with visible pixels)."""
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    picture = Image.fromarray(np.ascontiguousarray(pixels[..., :3]))
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return np.asarray(picture.resize(size, resample) if size != picture.size else picture)


def image_grid(
    images: Sequence[np.ndarray], captions: Sequence[str], path: Path, *, title: str = "", alerts: Sequence[bool] = ()
) -> Path:
    """Save the images in rows of up to MAX_COLUMNS, each over its caption (red where `alerts` says so).

    The figure grows with the count and the captions' lines, so thumbnails keep their size whether there are
    4 or 32 and captions never run into the row above. Images are placed as pixels (`figimage`) and captions as
    figure text: one Axes per thumbnail cost most of a report's drawing time.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images)
    columns = min(n, MAX_COLUMNS if n > 24 else 6) or 1
    rows = max(1, math.ceil(n / columns))
    side = CELL_INCHES - 2 * PAD_INCHES  # the image's square
    caption = LINE_INCHES * max((c.count("\n") + 1 for c in captions), default=1)
    cell = side + caption + 2 * PAD_INCHES
    heading = 0.5 if title else 0.0
    fig_width, fig_height = columns * CELL_INCHES, rows * cell + heading
    plots.use_fonts(captions)
    fig = Figure(figsize=(fig_width, fig_height), dpi=DPI)
    FigureCanvasAgg(fig)
    side_px = int(side * DPI)
    for i in range(n):
        row, column = divmod(i, columns)
        left = column * CELL_INCHES + PAD_INCHES
        bottom = fig_height - heading - (row + 1) * cell + PAD_INCHES
        pixels = fit_square(images[i], side_px)
        height, width = pixels.shape[:2]
        fig.figimage(
            pixels,
            xo=round(left * DPI + (side_px - width) / 2),
            yo=round(bottom * DPI + (side_px - height) / 2),
            origin="upper",
        )
        alert = bool(alerts[i]) if i < len(alerts) else False
        fig.text(
            left / fig_width,
            (bottom + side + CAPTION_GAP_INCHES) / fig_height,
            captions[i],
            fontsize=8,
            color="firebrick" if alert else "black",
            ha="left",
            va="bottom",
        )
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 0.15 / fig_height, va="top")
    fig.savefig(path, pil_kwargs={"compress_level": PNG_COMPRESSION})
    return path
