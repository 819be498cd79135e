"""Speed benchmark of the training and test paths against bare PyTorch, side by side on this machine.

    python benchmarks/run.py            # about 10 minutes on 2 CPU cores; prints a table, writes JSON
    python benchmarks/run.py --quick    # a one-minute smoke run of the same steps (numbers mean little)

Everything runs offline on the built-in digits, written to --workdir, each arm in its own process:
  a) training throughput of one fold: train.py (experiment=sample) vs a bare PyTorch loop
  b) a frozen-backbone 5-fold sweep at 224 px, 10 epochs: feature cache off vs on (cold, then warm)
  c) inference: test.py's run layer vs bare torch.inference_mode over the same images
  d) start-up: `train.py --help` and `train.py --cfg job`
  e) peak memory (RSS) of the sample fold of (a)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.sample_data import write_digits  # noqa: E402


def measured(cmd: list[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run `cmd`; its wall time, peak RSS (the largest of it and its reaped children) and output."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}\nfull log: {log}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "output": text}


def arm(name: str, work: Path, **kwargs: Any) -> dict[str, Any]:
    run = measured([sys.executable, "-m", "benchmarks.arms", name, json.dumps(kwargs)], ROOT, work / f"{name}.log")
    line = next(line for line in run["output"].splitlines() if line.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "peak_rss_mb": run["peak_rss_mb"]}


def train_py(work: Path, log_name: str, *overrides: str) -> dict[str, Any]:
    return measured([sys.executable, str(ROOT / "train.py"), *overrides], work, work / f"{log_name}.log")


def images_per_second(epochs: list[dict[str, float]]) -> float:
    """Steady state: the median epoch, so the first epoch's warm-up does not count."""
    return statistics.median(e["images"] / e["seconds"] for e in epochs)


def subset(src: Path, dst: Path, per_class: int) -> int:
    """The first `per_class` images of each class folder."""
    shutil.rmtree(dst, ignore_errors=True)
    n = 0
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, dst / class_dir.name / image.name)
            n += 1
    return n


def startup(work: Path, repeats: int) -> dict[str, float]:
    """Median wall time of the commands that must answer at once."""
    result = {}
    for name, args in (("train_py_help_s", ["--help"]), ("train_py_cfg_job_s", ["--cfg", "job"])):
        times = [train_py(work, "startup", *args)["seconds"] for _ in range(repeats)]
        result[name] = statistics.median(times)
    return result


def training_throughput(work: Path, data: Path, epochs: int) -> dict[str, Any]:
    timer = work / "epoch_timer.json"
    ours = train_py(
        work,
        "a_train_py",
        "experiment=sample",
        "fold=0",
        "logger=none",
        f"epochs={epochs}",
        f"data.train_dir={data}",
        "model_dir=models_a",
        f"hydra.run.dir={work}/outputs/a",
        f"+callbacks.epoch_timer={{_target_:benchmarks.arms.EpochTimer,path:'{timer}'}}",
    )
    ours_epochs = json.loads(timer.read_text())
    # The sample experiment's settings: ResNet18 trained end to end, 32 px, batch 64, lr 1e-3, no workers.
    bare = arm("bare_train", work, train_dir=str(data), image_size=32, batch_size=64, epochs=epochs, lr=1e-3)
    ours_ips, bare_ips = images_per_second(ours_epochs), images_per_second(bare["epochs"])
    return {
        "setting": f"experiment=sample fold=0: ResNet18 full fine-tune, 32 px, batch 64, {epochs} epochs, "
        f"{ours_epochs[0]['images']} training images",
        "train_py_images_per_s": ours_ips,
        "bare_images_per_s": bare_ips,
        "ratio": ours_ips / bare_ips,
        "train_py_fold_wall_s": ours["seconds"],
        "train_py_epochs": ours_epochs,
        "bare_epochs": bare["epochs"],
        "train_py_peak_rss_mb": ours["peak_rss_mb"],
        "bare_peak_rss_mb": bare["peak_rss_mb"],
    }


def sweep(work: Path, data: Path, n_images: int, epochs: int, image_size: int) -> dict[str, Any]:
    cache = work / "feature-cache"
    shutil.rmtree(cache, ignore_errors=True)
    base = [
        "-m",
        "fold=0,1,2,3,4",
        f"data.train_dir={data}",
        f"data.image_size={image_size}",
        "model.freeze_backbone=true",
        "model.weights=null",
        f"epochs={epochs}",
        "logger=none",
        f"feature_cache_dir={cache}",
        "model_dir=models_b",
    ]
    arms = {}
    for name, choice in (("off", "false"), ("on_cold", "true"), ("on_warm", "true")):
        run = train_py(
            work, f"b_sweep_{name}", *base, f"cache_features={choice}", f"hydra.sweep.dir={work}/multirun/{name}"
        )
        arms[name] = run["seconds"]
    return {
        "setting": f"5 folds x {epochs} epochs, ResNet18 frozen (random init), {image_size} px, batch 32, "
        f"{n_images} images, data.num_workers=auto, basic launcher",
        "off_s": arms["off"],
        "on_cold_s": arms["on_cold"],
        "on_warm_s": arms["on_warm"],
        "speedup_cold": arms["off"] / arms["on_cold"],
        "speedup_warm": arms["off"] / arms["on_warm"],
    }


def inference(work: Path, ckpt: Path, data: Path, size: int) -> dict[str, Any]:
    from src.data import resolve_num_workers

    bare = arm(
        "bare_infer", work, ckpt=str(ckpt), test_dir=str(data), batch_size=64, num_workers=resolve_num_workers("auto")
    )
    ours = arm("ours_test", work, ckpt=str(ckpt), test_dir=str(data), out_dir=str(work / "outputs" / "c"))
    ours_ips, bare_ips = ours["images"] / ours["seconds"], bare["images"] / bare["seconds"]
    return {
        "setting": f"{ckpt.name} ({size} px) over {ours['images']} images, batch 64, data.num_workers=auto",
        "test_py_images_per_s": ours_ips,
        "bare_images_per_s": bare_ips,
        "ratio": ours_ips / bare_ips,
        "test_py_s": ours["seconds"],
        "bare_s": bare["seconds"],
    }


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a, b, c, d = results["train_throughput"], results["sweep"], results["inference"], results["startup"]
    table = Table(title=f"benchmark on {results['machine']['cpus']} CPUs ({results['machine']['processor']})")
    for column in ("measure", "ours", "baseline", "ratio", "goal"):
        table.add_column(column, justify="right" if column != "measure" else "left")
    table.add_row(
        "a) training, one fold (img/s)",
        f"{a['train_py_images_per_s']:.1f}",
        f"{a['bare_images_per_s']:.1f} bare loop",
        f"{a['ratio']:.3f}x",
        ">= 0.95x",
    )
    table.add_row(
        "b) 5-fold frozen sweep, cache on (s)",
        f"{b['on_cold_s']:.1f} cold / {b['on_warm_s']:.1f} warm",
        f"{b['off_s']:.1f} cache off",
        f"{b['speedup_cold']:.1f}x / {b['speedup_warm']:.1f}x",
        ">= 10x",
    )
    table.add_row(
        "c) inference, test.py (img/s)",
        f"{c['test_py_images_per_s']:.1f}",
        f"{c['bare_images_per_s']:.1f} bare",
        f"{c['ratio']:.3f}x",
        ">= 0.9x",
    )
    table.add_row(
        "d) train.py --help / --cfg job (s)",
        f"{d['train_py_help_s']:.2f} / {d['train_py_cfg_job_s']:.2f}",
        "",
        "",
        "< 2 s",
    )
    table.add_row(
        "e) peak RSS, sample fold (MB)", f"{a['train_py_peak_rss_mb']:.0f}", f"{a['bare_peak_rss_mb']:.0f} bare", "", ""
    )
    Console().print(table)
    for key, value in (("a", a), ("b", b), ("c", c)):
        print(f"{key}) {value['setting']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "benchmark", help="scratch folder")
    parser.add_argument("--out", type=Path, help="JSON results (default: <workdir>/results.json)")
    parser.add_argument("--sweep-per-class", type=int, default=10, help="images per digit class in the sweep (b)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that every step runs")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    digits = work / "digits"
    if not (digits / "train").is_dir():
        write_digits(digits)
    per_class = 5 if args.quick else args.sweep_per_class
    sweep_data = work / "sweep_subset"
    n_sweep = subset(digits / "train", sweep_data, per_class)
    epochs_a, epochs_b, size_b = (2, 2, 64) if args.quick else (5, 10, 224)

    import torch

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "quick": args.quick,
    }
    print("d) start-up ...", flush=True)
    results["startup"] = startup(work, 1 if args.quick else 3)
    print("a, e) one sample fold: train.py vs bare loop ...", flush=True)
    results["train_throughput"] = training_throughput(work, digits / "train", epochs_a)
    print(f"b) 5-fold sweep on {n_sweep} images at {size_b} px: cache off, on (cold), on (warm) ...", flush=True)
    results["sweep"] = sweep(work, sweep_data, n_sweep, epochs_b, size_b)
    print("c) inference: test.py vs bare ...", flush=True)
    ckpt = work / "models_b" / "cnn_resnet18_freeze_backbone_True_fold_0.pth"
    results["inference"] = inference(work, ckpt, digits / "test", size_b)
    out = args.out or work / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
