"""GPU check of `trainer=gpu`: train one fold through train.py in fp32, in mixed precision, and in mixed
precision + channels-last (the `trainer=gpu` default), and print training images/s of each.

    python benchmarks/gpu_check.py                # about 2 minutes on one H100; offline, no weights needed
    python benchmarks/gpu_check.py --cpu-smoke    # the same steps on a CPU (bf16), tiny, to check the script

Data: the built-in digits (1,149 training images of fold 0) at 224 px, backbone trained end to end with
random init (model.weights=null), so the GPU does real work and the feature cache stays off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run as bench  # noqa: E402
from src.sample_data import write_digits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "gpu_check")
    parser.add_argument("--model", default="resnet50", help="a model config: resnet18, resnet50, ...")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5, help="images/s is the fastest epoch; the first one warms up")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on the CPU with bf16, 32 px, 1 epoch")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        args.model, args.image_size, args.batch_size, args.epochs = "resnet18", 32, 64, 1
        device, mixed = "cpu", ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; run this on a GPU machine, or pass --cpu-smoke to test the script")
    else:
        device, mixed = torch.cuda.get_device_name(0), []
    bench.MAX_WAIT_S = 0  # a lent GPU machine is ours alone: do not wait for idle CPUs
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "digits" / "train").is_dir():
        write_digits(work / "digits")
    arms = {
        "fp32": [*mixed, "trainer.precision=32-true", "callbacks.channels_last=null"],
        "16-mixed": [*mixed, "callbacks.channels_last=null"],
        "16-mixed + channels_last (trainer=gpu)": mixed,
    }
    results = {}
    for name, overrides in arms.items():
        slug = name.split(" ")[0] + ("_cl" if "channels_last" in name else "")
        timer = work / f"epochs_{slug}.json"
        run = bench.measured(
            [
                sys.executable,
                str(ROOT / "train.py"),
                "trainer=gpu",
                *overrides,
                f"model={args.model}",
                "model.weights=null",
                "model.freeze_backbone=false",
                f"data.train_dir={work / 'digits' / 'train'}",
                f"data.image_size={args.image_size}",
                f"batch_size={args.batch_size}",
                f"epochs={args.epochs}",
                "fold=0",
                "logger=none",
                "callbacks.rich_progress_bar=null",
                f"model_dir={work / 'models'}",
                f"hydra.run.dir={work / 'outputs' / slug}",
                f"+callbacks.epoch_timer={{_target_:benchmarks.arms.EpochTimer,path:'{timer}'}}",
            ],
            work,
            work / f"{slug}.log",
        )
        epochs = json.loads(timer.read_text())
        results[name] = {
            "images_per_s": bench.images_per_second(epochs),
            "fold_wall_s": run["seconds"],
            "epochs": epochs,
        }
        print(f"{name:40s} {results[name]['images_per_s']:9.1f} images/s   (fold: {run['seconds']:.1f} s)", flush=True)
    base = results["fp32"]["images_per_s"]
    print(f"\n{device}, {args.model}, {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs")
    for name, result in results.items():
        print(f"  {name:40s} {result['images_per_s']:9.1f} images/s  {result['images_per_s'] / base:5.2f}x fp32")
    out = work / "results.json"
    out.write_text(json.dumps({"device": device, "settings": vars(args) | {"workdir": str(work)}, **results}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
