"""Speed benchmark of the training and test paths against bare PyTorch, side by side on this machine.

    python benchmarks/run.py            # about 15 minutes on 2 CPU cores; prints a table, writes JSON
    python benchmarks/run.py --quick    # a short smoke run of the same steps (its numbers mean little)

Everything runs offline on the built-in digits, written to --workdir, each arm in its own process:
  a) training throughput of one fold: train.py (experiment=sample) vs a bare PyTorch loop
  b) a frozen-backbone 5-fold sweep at 224 px, 10 epochs: feature cache off vs on (cold, then warm)
  c) inference: test.py's run layer vs bare torch.inference_mode over the same images
  d) start-up: `train.py --help` and `train.py --cfg job`
  e) peak memory (RSS) of the sample fold of (a)

On a shared machine other processes skew every number (two busy torch processes on two cores slow
each other down several times over): each measurement first waits, up to --max-wait seconds, for
the CPUs to be idle and records how busy they were; (a) and (c) alternate their arms over --rounds
rounds and keep each arm's best.
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

MAX_WAIT_S = 120.0
THREADS: int | None = None  # --threads: OMP_NUM_THREADS for every measured process


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPU time that was not idle over the next `seconds` (Linux /proc/stat)."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]  # idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def settle(threshold: float = 0.1) -> float:
    """Wait until other processes leave the CPUs idle (or MAX_WAIT_S passes); return the last busy fraction."""
    deadline = time.monotonic() + MAX_WAIT_S
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return round(busy, 3)


def measured(cmd: list[str], cwd: Path, log: Path) -> dict[str, Any]:
    """Run `cmd` once the CPUs are idle; its wall time, peak RSS (it or its largest reaped child), output."""
    busy = settle()
    start = time.perf_counter()
    with log.open("w") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(THREADS)} if THREADS else {})}
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{text[-3000:]}\nfull log: {log}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_busy_before": busy, "output": text}


def arm(name: str, work: Path, **kwargs: Any) -> dict[str, Any]:
    """One arm of benchmarks/arms.py in a fresh process."""
    run = measured([sys.executable, "-m", "benchmarks.arms", name, json.dumps(kwargs)], ROOT, work / f"{name}.log")
    line = next(line for line in run["output"].splitlines() if line.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), **{k: v for k, v in run.items() if k != "output"}}


def train_py(work: Path, log_name: str, *overrides: str) -> dict[str, Any]:
    return measured([sys.executable, str(ROOT / "train.py"), *overrides], work, work / f"{log_name}.log")


def images_per_second(epochs: list[dict[str, float]]) -> float:
    """The fastest epoch: the first one's warm-up and epochs slowed by other processes do not count."""
    return max(e["images"] / e["seconds"] for e in epochs)


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


def startup(work: Path, repeats: int) -> dict[str, Any]:
    """Wall time of the commands that must answer at once, whole process included."""
    result: dict[str, Any] = {}
    for name, args in (("train_py_help", ["--help"]), ("train_py_cfg_job", ["--cfg", "job"])):
        times = [train_py(work, "d_startup", *args)["seconds"] for _ in range(repeats)]
        result[f"{name}_s"], result[f"{name}_median_s"] = min(times), statistics.median(times)
    return result


def training_throughput(work: Path, data: Path, epochs: int, rounds: int) -> dict[str, Any]:
    """(a) and (e): the sample experiment's fold 0 through train.py, and the same fold in a bare loop."""
    ours_epochs, bare_epochs, ours_runs, bare_runs = [], [], [], []
    for r in range(rounds):
        timer = work / f"a_epoch_timer_{r}.json"
        ours_runs.append(
            train_py(
                work,
                f"a_train_py_{r}",
                "experiment=sample",
                "fold=0",
                "logger=none",
                f"epochs={epochs}",
                f"data.train_dir={data}",
                "model_dir=models_a",
                f"hydra.run.dir={work}/outputs/a{r}",
                f"+callbacks.epoch_timer={{_target_:benchmarks.arms.EpochTimer,path:'{timer}'}}",
            )
        )
        ours_epochs += json.loads(timer.read_text())
        # The sample experiment's settings: ResNet18 trained end to end, 32 px, batch 64, lr 1e-3, no workers.
        bare = arm("bare_train", work, train_dir=str(data), image_size=32, batch_size=64, epochs=epochs, lr=1e-3)
        bare_runs.append(bare)
        bare_epochs += bare["epochs"]
    ours_ips, bare_ips = images_per_second(ours_epochs), images_per_second(bare_epochs)
    return {
        "setting": f"experiment=sample fold=0: ResNet18 trained end to end, 32 px, batch 64, num_workers=0, "
        f"{ours_epochs[0]['images']} training images, {epochs} epochs x {rounds} rounds",
        "train_py_images_per_s": ours_ips,
        "bare_images_per_s": bare_ips,
        "ratio": ours_ips / bare_ips,
        "train_py_median_images_per_s": statistics.median(e["images"] / e["seconds"] for e in ours_epochs),
        "bare_median_images_per_s": statistics.median(e["images"] / e["seconds"] for e in bare_epochs),
        "train_py_fold_wall_s": min(r["seconds"] for r in ours_runs),
        "train_py_peak_rss_mb": max(r["peak_rss_mb"] for r in ours_runs),
        "bare_peak_rss_mb": max(r["peak_rss_mb"] for r in bare_runs),
        "train_py_epochs": ours_epochs,
        "bare_epochs": bare_epochs,
        "cpu_busy_before": [r["cpu_busy_before"] for r in ours_runs + bare_runs],
    }


def sweep(work: Path, data: Path, n_images: int, epochs: int, image_size: int) -> dict[str, Any]:
    """(b): `train.py -m fold=0,1,2,3,4`, end to end, with the cache off, on from empty, and on again."""
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
    runs = {}
    for name, choice in (("off", "false"), ("on_cold", "true"), ("on_warm", "true")):
        sweep_dir = f"hydra.sweep.dir={work}/multirun/{name}"
        runs[name] = train_py(work, f"b_sweep_{name}", *base, f"cache_features={choice}", sweep_dir)
    return {
        "setting": f"5 folds x {epochs} epochs, ResNet18 frozen (random init), {image_size} px, batch 32, "
        f"{n_images} images, data.num_workers=auto, basic launcher, one process",
        "epochs": epochs,
        "off_s": runs["off"]["seconds"],
        "on_cold_s": runs["on_cold"]["seconds"],
        "on_warm_s": runs["on_warm"]["seconds"],
        "speedup_cold": runs["off"]["seconds"] / runs["on_cold"]["seconds"],
        "speedup_warm": runs["off"]["seconds"] / runs["on_warm"]["seconds"],
        "cpu_busy_before": {name: run["cpu_busy_before"] for name, run in runs.items()},
    }


def inference(work: Path, ckpt: Path, data: Path, size: int, rounds: int) -> dict[str, Any]:
    """(c): the prediction stage (decode, transform, forward) of test.py and of a bare loop; and test.py's
    whole run layer (model load, image scan, reports with their sklearn/matplotlib imports) against the
    bare loop with its model load."""
    from src.data import resolve_num_workers

    workers = resolve_num_workers("auto")
    bare, ours = [], []
    for r in range(rounds):
        bare.append(arm("bare_infer", work, ckpt=str(ckpt), test_dir=str(data), batch_size=64, num_workers=workers))
        ours.append(arm("ours_test", work, ckpt=str(ckpt), test_dir=str(data), out_dir=str(work / "outputs" / f"c{r}")))
    n = ours[0]["images"]
    best_ours, best_bare = min(r["predict_seconds"] for r in ours), min(r["predict_seconds"] for r in bare)
    run_layer, bare_total = min(r["seconds"] for r in ours), min(r["seconds"] for r in bare)
    return {
        "setting": f"{ckpt.name} ({size} px) over {n} images, batch 64, num_workers=auto ({workers}), "
        f"best of {rounds} rounds",
        "test_py_images_per_s": n / best_ours,
        "bare_images_per_s": n / best_bare,
        "ratio": best_bare / best_ours,
        "test_py_run_layer_s": run_layer,
        "bare_with_model_load_s": bare_total,
        "ratio_end_to_end": bare_total / run_layer,
        "cpu_busy_before": [r["cpu_busy_before"] for r in bare + ours],
    }


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    a, b, c, d = (results.get(k) for k in ("train_throughput", "sweep", "inference", "startup"))
    table = Table(title=f"benchmark on {results['machine']['cpus']} CPUs ({results['machine']['processor']})")
    for column in ("measure", "ours", "baseline", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    rows = []
    if a:
        rows.append(
            (
                "a) training, one fold (images/s)",
                f"{a['train_py_images_per_s']:.1f}",
                f"{a['bare_images_per_s']:.1f} bare loop",
                f"{a['ratio']:.3f}x",
                ">= 0.95x",
            )
        )
    if b:
        rows.append(
            (
                f"b) 5-fold frozen sweep, {b['epochs']} epochs (s)",
                f"cache on {b['on_cold_s']:.1f} cold, {b['on_warm_s']:.1f} warm",
                f"cache off {b['off_s']:.1f}",
                f"{b['speedup_cold']:.1f}x cold, {b['speedup_warm']:.1f}x warm",
                ">= 10x",
            )
        )
    if c:
        rows.append(
            (
                "c) inference, test.py (images/s)",
                f"{c['test_py_images_per_s']:.1f}",
                f"{c['bare_images_per_s']:.1f} bare",
                f"{c['ratio']:.3f}x",
                ">= 0.9x",
            )
        )
        rows.append(
            (
                "   test.py run layer, end to end (s)",
                f"{c['test_py_run_layer_s']:.1f}",
                f"{c['bare_with_model_load_s']:.1f} bare",
                f"{c['ratio_end_to_end']:.3f}x",
                "",
            )
        )
    if d:
        help_s, cfg_s = d["train_py_help_s"], d["train_py_cfg_job_s"]
        rows.append(("d) train.py --help / --cfg job (s)", f"{help_s:.2f} / {cfg_s:.2f}", "", "", "< 2 s"))
    if a:
        rss = (f"{a['train_py_peak_rss_mb']:.0f}", f"{a['bare_peak_rss_mb']:.0f} bare")
        rows.append(("e) peak RSS, sample fold (MB)", *rss, "", ""))
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    for key, value in (("a", a), ("b", b), ("c", c)):
        if value:
            print(f"{key}) {value['setting']}")


def main() -> None:
    global MAX_WAIT_S, THREADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "benchmark", help="scratch folder")
    parser.add_argument("--out", type=Path, help="JSON results (default: <workdir>/results.json)")
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated steps; c scores the model b exported")
    parser.add_argument("--sweep-per-class", type=int, default=20, help="images per digit class in the sweep (b)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a) and (c)")
    parser.add_argument("--max-wait", type=float, default=MAX_WAIT_S, help="seconds to wait for idle CPUs")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every measured process (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that every step runs")
    args = parser.parse_args()
    MAX_WAIT_S, THREADS = args.max_wait, args.threads
    steps = set(args.only.split(","))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    digits = work / "digits"
    if not (digits / "train").is_dir():
        write_digits(digits)
    per_class, rounds = (5, 1) if args.quick else (args.sweep_per_class, args.rounds)
    sweep_data = work / "sweep_subset"
    n_sweep = subset(digits / "train", sweep_data, per_class)
    epochs_a, epochs_b, size_b = (1, 2, 64) if args.quick else (4, 10, 224)
    ckpt = work / "models_b" / "cnn_resnet18_freeze_backbone_True_fold_0.pth"
    if "c" in steps and "b" not in steps and not ckpt.is_file():
        raise SystemExit(f"step c scores {ckpt}, which step b writes: add b to --only")

    import torch

    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": args.threads or torch.get_num_threads(),
        },
        "quick": args.quick,
    }
    if "d" in steps:
        print("d) start-up ...", flush=True)
        results["startup"] = startup(work, 1 if args.quick else 3)
    if "a" in steps:
        print("a, e) one sample fold: train.py vs bare loop ...", flush=True)
        results["train_throughput"] = training_throughput(work, digits / "train", epochs_a, rounds)
    if "b" in steps:
        print(f"b) 5-fold sweep on {n_sweep} images at {size_b} px: cache off, on (cold), on (warm) ...", flush=True)
        results["sweep"] = sweep(work, sweep_data, n_sweep, epochs_b, size_b)
    if "c" in steps:
        print("c) inference: test.py vs bare ...", flush=True)
        results["inference"] = inference(work, ckpt, digits / "test", size_b, rounds)
    out = args.out or work / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
