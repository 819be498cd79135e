"""Loader check of the decoded-image store: images/s that the training DataLoader delivers at 224 px, per epoch,
with `data.decode_cache=none`, `ram` and `disk`.

    python benchmarks/loader_bench.py               # ~3-5 min on 2 CPU cores
    python benchmarks/loader_bench.py --quick       # a smoke run; its numbers mean nothing

Data: photo-sized JPEGs (about 500x375, varied aspect ratios, smooth content plus noise, quality 90) written
once to the work folder, 5 classes; fold 0 of 5 is the training set. Each arm builds the project's own
FoldDataModule (data.augment=true, data.num_workers=auto unless --workers) and reads its training loader for
`--epochs` epochs, no model. Images are resized to 256 px (what resnet18's weights resize to for a 224 crop) and
then cropped. The `none` arm delivers normalised float batches; the store arms deliver the uint8 crops every
trainer gets from the store (the model scales and normalises a whole batch on its device, a few ms per batch on a
CPU); `ram, float` converts in the workers instead, for comparison. Epoch 1 of the store arms includes
building the store (a `disk` store is deleted first, so it is written cold). The load average and CPU busy
fraction before each arm are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402


def write_photos(root: Path, n: int, seed: int = 0) -> None:
    """`n` JPEGs of photo size and cost to decode, spread over 5 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        low = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h))
        pixels = np.asarray(low, dtype=np.int16) + rng.integers(-20, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def measure(mode: str, uint8: bool, train_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Per-epoch seconds and images/s of one arm's training loader."""
    from src.data import FoldDataModule

    busy = bench.settle()
    load = os.getloadavg()
    cache = work / "cache"
    shutil.rmtree(cache / "decoded", ignore_errors=True)
    dm = FoldDataModule(
        str(train_dir),
        0,
        5,
        image_size=args.image_size,
        resize_size=round(args.image_size * 256 / 224),
        augment=True,
        batch_size=args.batch_size,
        num_workers=args.workers,
        decode_cache=mode,
        hash_cache_dir=str(cache),
    )
    dm.setup()
    dm.uint8_batches = uint8
    epochs = []
    loader = None
    for _ in range(args.epochs):
        start = time.perf_counter()
        loader = loader or dm.train_dataloader()  # builds the store on first use, as Lightning would
        images = 0
        for _, y in loader:
            images += len(y)
        seconds = time.perf_counter() - start
        epochs.append({"seconds": seconds, "images": images, "images_per_s": images / seconds})
    later = [e["images_per_s"] for e in epochs[1:]] or [epochs[0]["images_per_s"]]
    return {
        "mode": dm.decoded.mode if dm.decoded is not None else "none",
        "workers": dm.num_workers,
        "epochs": epochs,
        "epoch1_images_per_s": epochs[0]["images_per_s"],
        "later_median_images_per_s": statistics.median(later),
        "cpu_busy_before": busy,
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "loader_bench")
    parser.add_argument("--images", type=int, default=500, help="photos written (fold 0 trains on 4/5 of them)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="data.num_workers")
    parser.add_argument("--max-wait", type=float, default=bench.MAX_WAIT_S, help="seconds to wait for idle CPUs")
    parser.add_argument("--quick", action="store_true", help="50 images, 2 epochs, no waiting")
    args = parser.parse_args()
    if args.quick:
        args.images, args.epochs, args.max_wait = 50, 2, 0
    bench.MAX_WAIT_S = args.max_wait

    import torch

    work = args.workdir.resolve()
    train_dir = work / f"photos_{args.images}"
    if not train_dir.is_dir():
        write_photos(train_dir, args.images)
    arms = {"none": ("none", False), "ram": ("ram", True), "disk": ("disk", True), "ram, float": ("ram", False)}
    results = {name: measure(mode, uint8, train_dir, work, args) for name, (mode, uint8) in arms.items()}
    base = results["none"]["later_median_images_per_s"]
    print(
        f"\n{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{args.image_size} px, batch {args.batch_size}, {args.images} photos, data.augment=true"
    )
    print(f"  {'decode_cache':12s} {'workers':>7s} {'epoch 1':>9s} {'epochs 2+':>10s} {'vs none':>8s}  load before")
    for name, r in results.items():
        print(
            f"  {name if r['mode'] in name else name + ' -> ' + r['mode']:12s} {r['workers']:7d} "
            f"{r['epoch1_images_per_s']:9.1f} {r['later_median_images_per_s']:10.1f} "
            f"{r['later_median_images_per_s'] / base:7.2f}x  {', '.join(f'{v:.2f}' for v in r['loadavg_before'])}"
        )
    out = work / "results.json"
    out.write_text(json.dumps({"settings": vars(args) | {"workdir": str(work)}, **results}, indent=2, default=str))
    print(f"images/s: training loader, median of epochs 2+; results: {out}")


if __name__ == "__main__":
    main()
