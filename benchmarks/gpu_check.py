"""GPU check of `trainer=gpu`: train one fold through train.py in fp32, in mixed precision, and in mixed
precision + channels-last (the `trainer=gpu` default), and print training images/s of each (step `precision`);
then the same `trainer=gpu` on photo-sized JPEGs with `data.decode_cache=none` and `ram`, against the same model
trained on synthetic batches held on the GPU, the GPU's own limit (step `decode`).

    python benchmarks/gpu_check.py                # about 5 minutes on one H100; offline, no weights needed
    python benchmarks/gpu_check.py --only decode  # the decoded-image store step alone
    python benchmarks/gpu_check.py --cpu-smoke    # the same steps on a CPU (bf16), tiny, to check the script

Data: `precision`: the built-in digits (1,149 training images of fold 0); `decode`: --photos JPEGs of about
500x375 (benchmarks/loader_bench.py writes them), data.augment=true; both at 224 px, backbone trained end to
end with random init (model.weights=null), so the GPU does real work and the feature cache stays off.
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
    parser.add_argument("--only", default="precision,decode", help="steps: precision (digits), decode (photos)")
    parser.add_argument("--photos", type=int, default=2500, help="photo-sized JPEGs of the decode step")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        args.model, args.image_size, args.batch_size, args.epochs, args.photos = "resnet18", 32, 64, 1, 100
        device, mixed = "cpu", ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; run this on a GPU machine, or pass --cpu-smoke to test the script")
    else:
        device, mixed = torch.cuda.get_device_name(0), []
    bench.MAX_WAIT_S = 0  # a lent GPU machine is ours alone: do not wait for idle CPUs
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if "precision" in args.only:
        if not (work / "digits" / "train").is_dir():
            write_digits(work / "digits")
        arms = {
            "fp32": [*mixed, "trainer.precision=32-true", "callbacks.channels_last=null"],
            "16-mixed": [*mixed, "callbacks.channels_last=null"],
            "16-mixed + channels_last (trainer=gpu)": mixed,
        }
        for name, overrides in arms.items():
            results[name] = train_arm(name, overrides, work / "digits" / "train", work, args)
        base = results["fp32"]["images_per_s"]
        print(f"\n{device}, {args.model}, {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs")
        for name, result in results.items():
            print(f"  {name:40s} {result['images_per_s']:9.1f} images/s  {result['images_per_s'] / base:5.2f}x fp32")
    if "decode" in args.only:
        results["decode"] = decode_step(work, args, mixed, device)
    out = work / "results.json"
    out.write_text(json.dumps({"device": device, "settings": vars(args) | {"workdir": str(work)}, **results}, indent=2))
    print(f"results: {out}")


def train_arm(name: str, overrides: list[str], train_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """One fold through train.py with `trainer=gpu` and `overrides`; images/s of its fastest training epoch."""
    slug = name.split(" ")[0].replace("=", "_") + ("_cl" if "channels_last" in name else "")
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
            f"data.train_dir={train_dir}",
            f"data.image_size={args.image_size}",
            f"batch_size={args.batch_size}",
            f"epochs={args.epochs}",
            "fold=0",
            "logger=none",
            "data.audit_duplicates=false",
            "callbacks.rich_progress_bar=null",
            f"model_dir={work / 'models'}",
            f"feature_cache_dir={work / 'cache'}",
            f"hydra.run.dir={work / 'outputs' / slug}",
            f"+callbacks.epoch_timer={{_target_:benchmarks.arms.EpochTimer,path:'{timer}'}}",
        ],
        work,
        work / f"{slug}.log",
    )
    epochs = json.loads(timer.read_text())
    result = {"images_per_s": bench.images_per_second(epochs), "fold_wall_s": run["seconds"], "epochs": epochs}
    print(f"{name:40s} {result['images_per_s']:9.1f} images/s   (fold: {run['seconds']:.1f} s)", flush=True)
    return result


def synthetic_limit(args: argparse.Namespace, steps: int, warmup: int = 5) -> float:
    """Training images/s of the same model on one uint8 batch held on the device: no loader, no Lightning, the
    mixed precision and channels-last of `trainer=gpu`; the conversion to float runs in the model, as with the store."""
    import time

    import torch

    from src.model import ImageClassifier

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.bfloat16
    net = ImageClassifier(args.model, [str(k) for k in range(5)], args.image_size, freeze_backbone=False)
    net = net.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(enabled=cuda)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.randint(0, 256, size, dtype=torch.uint8, device=device)
    y = torch.randint(0, 5, (args.batch_size,), device=device)
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize() if cuda else None
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype):
            loss = net.criterion(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize() if cuda else None
    return steps * args.batch_size / (time.perf_counter() - start)


def decode_step(work: Path, args: argparse.Namespace, mixed: list[str], device: str) -> dict:
    """`trainer=gpu` on photo-sized JPEGs with and without the decoded-image store, against the synthetic limit."""
    from benchmarks.loader_bench import write_photos

    photos = work / f"photos_{args.photos}"
    if not photos.is_dir():
        write_photos(photos, args.photos)
    common = [*mixed, "data.augment=true"]
    result = {
        "none": train_arm("decode_cache=none", [*common, "data.decode_cache=none"], photos, work, args),
        "ram": train_arm("decode_cache=ram", [*common, "data.decode_cache=ram"], photos, work, args),
        "synthetic_images_per_s": synthetic_limit(args, steps=5 if args.cpu_smoke else 50),
    }
    limit = result["synthetic_images_per_s"]
    print(f"\n{device}, {args.model}, {args.image_size} px, batch {args.batch_size}, {args.photos} photos, augment")
    print(f"  {'synthetic batches on the device (limit)':40s} {limit:9.1f} images/s")
    for name in ("none", "ram"):
        ips = result[name]["images_per_s"]
        print(f"  {'trainer=gpu, data.decode_cache=' + name:40s} {ips:9.1f} images/s  {ips / limit:5.2f}x limit")
    return result


if __name__ == "__main__":
    main()
