"""Write scikit-learn's handwritten digits as an ImageFolder tree of PNGs.

Run `python -m src.sample_data [--out data]`. The output is byte-for-byte the
same on every run and machine, so a fresh copy keeps matching `data.dvc`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from src.errors import UserError


def digits_layout(test_size: float = 0.2, seed: int = 0) -> dict[Path, np.ndarray]:
    """Map each relative output path (`train/3/0042.png`) to its 8x8 uint8 image."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(index, test_size=test_size, stratify=digits.target, random_state=seed)
    layout = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in sorted(idx):
            layout[Path(split) / str(digits.target[i]) / f"{i:04d}.png"] = pixels[i]
    return layout


def write_digits(out: Path) -> dict[str, int]:
    """Write the digits under `out`; refuse to mix them with images that are already there."""
    layout = digits_layout()
    foreign = [
        p
        for split in ("train", "test")
        if (out / split).is_dir()
        for p in (out / split).rglob("*")
        if p.is_file() and p.relative_to(out) not in layout
    ]
    if foreign:
        raise UserError(
            f"{out}/ already holds {len(foreign)} files that are not the sample digits "
            f"(e.g. {foreign[0]}); write the sample elsewhere with --out, or move them first"
        )
    for rel, image in layout.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # Pillow writes no timestamp into a PNG, so the bytes are the same on every run.
        Image.fromarray(image).save(path)
    return {split: sum(1 for rel in layout if rel.parts[0] == split) for split in ("train", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as PNG class folders.")
    parser.add_argument("--out", type=Path, default=Path("data"), help="output folder (default: data)")
    args = parser.parse_args()
    try:
        counts = write_digits(args.out)
    except UserError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {counts['train']} train and {counts['test']} test images to {args.out}/")


if __name__ == "__main__":
    main()
