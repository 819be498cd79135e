"""Speed benchmark of the training and test paths against bare PyTorch, side by side on this machine.

    python benchmarks/run.py            # about 15 minutes on 2 CPU cores; prints a table, writes JSON
    python benchmarks/run.py --quick    # a short smoke run of the same steps (its numbers mean little)

Everything runs offline on the built-in digits, written to --workdir, each arm in its own process:
  a) training throughput of one fold: train.py (experiment=sample) vs a bare PyTorch loop, interleaved rounds
  b) a frozen-backbone 5-fold sweep at 224 px, 10 epochs: feature cache off vs on (cold, then warm), side by
     side, with each job's fixed cost (job wall time - time inside training and validation steps)
  s) the short form of (b): 2 folds x 4 epochs, 240 images, 224 px, logged to MLflow (a sqlite store)
  r) the long form of (b), warm cache, logged to MLflow: into a new store, then the same sweep again into it
     (a user's next sweep of the same configuration: its parent is completed once, at the end)
  c) inference: test.py's run layer vs bare torch.inference_mode over the same images
  d) start-up: `train.py --help` and `train.py --cfg job`
  e) peak memory (RSS) of the sample fold of (a)
  f) disk: what a `make demo` (5-fold sample sweep logged to MLflow + test.py of the champion) leaves, by `du`

On a shared machine other processes skew every number (two busy torch processes on two cores slow
each other down several times over): each measurement first waits, up to --max-wait seconds, for
the CPUs to be idle and records how busy they were and the load average; (a) alternates its arms over
--rounds rounds and reports the median round of each, (c) keeps each arm's best.
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
    load = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    with log.open("w") as out:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(THREADS)} if THREADS else {})}
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{text[-3000:]}\nfull log: {log}")
    return {
        "seconds": seconds,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "cpu_busy_before": busy,
        "loadavg_before": load,
        "output": text,
    }


def arm(name: str, work: Path, **kwargs: Any) -> dict[str, Any]:
    """One arm of benchmarks/arms.py in a fresh process."""
    run = measured([sys.executable, "-m", "benchmarks.arms", name, json.dumps(kwargs)], ROOT, work / f"{name}.log")
    line = next(line for line in run["output"].splitlines() if line.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), **{k: v for k, v in run.items() if k != "output"}}


def train_py(work: Path, log_name: str, *overrides: str) -> dict[str, Any]:
    return measured([sys.executable, str(ROOT / "train.py"), *overrides], work, work / f"{log_name}.log")


def images_per_second(epochs: list[dict[str, float]]) -> float:
    """One round's throughput: all its training epochs but the first (warm-up), images over seconds."""
    rest = epochs[1:] or epochs
    return sum(e["images"] for e in rest) / sum(e["seconds"] for e in rest)


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
    """(a) and (e): the sample experiment's fold 0 through train.py, and the same fold in two bare loops (Adam
    as `torch.optim.Adam(params, lr)` gives it, and the fused Adam that train.py's configs use), in interleaved
    rounds; each arm's figure is the median of its rounds, each round waits for idle CPUs first."""
    from src.data import resolve_num_workers

    workers = resolve_num_workers("auto")
    runs: dict[str, list[dict[str, Any]]] = {"train_py": [], "bare": [], "bare_fused": []}
    for r in range(rounds):
        timer = work / f"a_epoch_timer_{r}.json"
        run = train_py(
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
        runs["train_py"].append({**run, "epochs": json.loads(timer.read_text())})
        # The sample experiment's settings: ResNet18 trained end to end, 32 px, batch 64, lr 1e-3, and the loader
        # workers that data.num_workers=auto gives train.py.
        for name, fused in (("bare", None), ("bare_fused", True)):
            runs[name].append(
                arm(
                    "bare_train",
                    work,
                    train_dir=str(data),
                    image_size=32,
                    batch_size=64,
                    epochs=epochs,
                    lr=1e-3,
                    num_workers=workers,
                    fused=fused,
                )
            )
    ips = {name: [images_per_second(r["epochs"]) for r in arm_runs] for name, arm_runs in runs.items()}
    median = {name: statistics.median(values) for name, values in ips.items()}
    batch, images = 64, runs["train_py"][0]["epochs"][0]["images"]
    return {
        "setting": f"experiment=sample fold=0: ResNet18 trained end to end, 32 px, batch {batch}, "
        f"{workers} loader worker(s) in every arm (data.num_workers=auto), "
        f"{images} training images, {epochs} epochs; median of {rounds} interleaved rounds (epoch 1 is warm-up)",
        "train_py_images_per_s": median["train_py"],
        "bare_images_per_s": median["bare"],
        "bare_fused_images_per_s": median["bare_fused"],
        "ratio": median["train_py"] / median["bare"],
        "ratio_same_optimizer": median["train_py"] / median["bare_fused"],
        "per_round": {
            **ips,
            "ratio": [o / b for o, b in zip(ips["train_py"], ips["bare"], strict=True)],
            "ratio_same_optimizer": [o / b for o, b in zip(ips["train_py"], ips["bare_fused"], strict=True)],
        },
        # What our path costs per batch beyond the loop with the same (fused) optimizer: Lightning, metrics, hooks.
        "extra_ms_per_step": 1000 * batch * (1 / median["train_py"] - 1 / median["bare_fused"]),
        "train_py_fold_wall_s": statistics.median(r["seconds"] for r in runs["train_py"]),
        "train_py_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["train_py"]),
        "bare_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["bare"]),
        "cpu_busy_before": {name: [r["cpu_busy_before"] for r in arm_runs] for name, arm_runs in runs.items()},
        "loadavg_before": {name: [r["loadavg_before"] for r in arm_runs] for name, arm_runs in runs.items()},
    }


def frozen_sweep(data: Path, folds: int, epochs: int, image_size: int, cache: Path, model_dir: str) -> list[str]:
    """train.py arguments of the frozen-backbone sweep that (b), (s) and (r) time."""
    return [
        "-m",
        f"fold={','.join(map(str, range(folds)))}",
        f"data.train_dir={data}",
        f"data.image_size={image_size}",
        "model.freeze_backbone=true",
        "model.weights=null",
        f"epochs={epochs}",
        f"feature_cache_dir={cache}",
        f"model_dir={model_dir}",
    ]


def sweep(
    work: Path, data: Path, n_images: int, folds: int, epochs: int, image_size: int, name: str, mlflow: bool = False
) -> dict[str, Any]:
    """(b), (s): `train.py -m fold=0,..`, end to end, with the cache off, on from empty, and on again, one after
    the other; each job's wall time, time inside training/validation steps, and the rest (its fixed cost)."""
    cache = work / f"feature-cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    base = [
        *frozen_sweep(data, folds, epochs, image_size, cache, f"models_{name}"),
        "+callbacks.step_timer={_target_:benchmarks.arms.StepTimer}",
    ]
    runs, jobs = {}, {}
    if mlflow:  # each arm's new store is a copy of the empty one made once per machine (seed_sqlite_store): made now
        from src.tracking.store import seed_sqlite_store

        probe = work / f"{name}-probe.db"
        seed_sqlite_store(f"sqlite:///{probe}")
        probe.unlink(missing_ok=True)
    for arm_name, choice in (("off", "false"), ("on_cold", "true"), ("on_warm", "true")):
        timer = work / f"{name}_jobs_{arm_name}.jsonl"
        timer.unlink(missing_ok=True)
        logger = [f"logger.tracking_uri=sqlite:///{work}/{name}-{arm_name}/mlflow.db"] if mlflow else ["logger=none"]
        if mlflow:
            shutil.rmtree(work / f"{name}-{arm_name}", ignore_errors=True)
            (work / f"{name}-{arm_name}").mkdir()
        runs[arm_name] = train_py(
            work,
            f"{name}_sweep_{arm_name}",
            *base,
            *logger,
            f"cache_features={choice}",
            f"hydra.sweep.dir={work}/multirun/{name}-{arm_name}",
            f"+hydra.callbacks.job_timer={{_target_:benchmarks.job_timer.JobTimer,path:'{timer}'}}",
        )
        jobs[arm_name] = [json.loads(line) for line in timer.read_text().splitlines()]
    off, cold, warm = (runs[k]["seconds"] for k in ("off", "on_cold", "on_warm"))
    return {
        "setting": f"{folds} folds x {epochs} epochs, ResNet18 frozen (random init), {image_size} px, batch 32, "
        f"{n_images} images, data.num_workers=auto, basic launcher, one process, "
        f"{'MLflow (sqlite store, registry, ensemble)' if mlflow else 'logger=none'}",
        "folds": folds,
        "epochs": epochs,
        "off_s": off,
        "on_cold_s": cold,
        "on_warm_s": warm,
        "speedup_cold": off / cold,
        "speedup_warm": off / warm,
        "jobs": jobs,
        "fixed_s_per_job": {k: [round(j["fixed_s"], 3) for j in v] for k, v in jobs.items()},
        "cpu_busy_before": {k: run["cpu_busy_before"] for k, run in runs.items()},
        "loadavg_before": {k: run["loadavg_before"] for k, run in runs.items()},
    }


def resweep(work: Path, data: Path, folds: int, epochs: int, image_size: int) -> dict[str, Any]:
    """(r): the frozen sweep of (b) with its filled feature cache, logged to a new MLflow store, then run again
    into the same store; each one's wall time and the fold ensembles it registered."""
    from mlflow import MlflowClient

    store = work / "r-store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    args = [
        *frozen_sweep(data, folds, epochs, image_size, work / "feature-cache-b", "models_r"),
        f"logger.tracking_uri={uri}",
    ]
    result: dict[str, Any] = {
        "setting": f"(b) with its filled cache, {folds} folds x {epochs} epochs, {image_size} px, MLflow (sqlite)"
    }
    ensembles = 0
    for arm_name in ("first", "again"):
        run = train_py(work, f"r_sweep_{arm_name}", *args, f"hydra.sweep.dir={work}/multirun/r-{arm_name}")
        versions = MlflowClient(uri, registry_uri=uri).search_model_versions("name = 'resnet18_classifier'")
        total = sum(v.tags.get("kind") == "cv_ensemble" for v in versions)
        result[arm_name] = {
            "seconds": run["seconds"],
            "ensembles_registered": total - ensembles,
            "cpu_busy_before": run["cpu_busy_before"],
            "loadavg_before": run["loadavg_before"],
        }
        ensembles = total
    return result


def disk(work: Path, data: Path, test_data: Path, quick: bool = False) -> dict[str, Any]:
    """(f): `make demo` in a scratch folder standing for the repository: the 5-fold sample sweep logged to MLflow
    (sqlite store, local artifacts), then test.py of the champion; `du` of what it leaves there, and of the user's
    cache folder (here XDG_CACHE_HOME=<workdir>/demo-user-cache: the ONNX cache, the empty MLflow store)."""
    repo, user_cache = work / "demo-repo", work / "demo-user-cache"
    for folder in (repo, user_cache):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    os.environ["XDG_CACHE_HOME"] = str(user_cache)
    uri = f"logger.tracking_uri=sqlite:///{repo}/mlflow.db"
    train = measured(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "experiment=sample",
            "fold=0,1,2,3,4",
            f"data.train_dir={data}",
            uri,
            *(["epochs=1"] if quick else []),
        ],
        repo,
        work / "f_demo_train.log",
    )
    test = measured(
        [
            sys.executable,
            str(ROOT / "test.py"),
            "ckpt=models:/resnet18_classifier@champion",
            f"data.test_dir={test_data}",
            uri,
        ],
        repo,
        work / "f_demo_test.log",
    )
    del os.environ["XDG_CACHE_HOME"]

    def du(path: Path) -> float:
        out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout
        return float(out.split()[0])

    return {
        "setting": "make demo: train.py -m experiment=sample fold=0,1,2,3,4 (ResNet18 from scratch, 32 px, 5 epochs, "
        "MLflow sqlite + ./mlruns), then test.py ckpt=models:/resnet18_classifier@champion; du -sm (hard links once)",
        "repo_mb": du(repo),
        "by_folder_mb": {p.name: du(p) for p in sorted(repo.iterdir())},
        "user_cache_mb": du(user_cache),
        "train_s": train["seconds"],
        "test_s": test["seconds"],
        "cpu_busy_before": [train["cpu_busy_before"], test["cpu_busy_before"]],
        "loadavg_before": [train["loadavg_before"], test["loadavg_before"]],
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
    short, f, r = results.get("sweep_short"), results.get("disk"), results.get("resweep")
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
        rows.append(
            (
                "   the same, bare loop with fused Adam",
                f"{a['train_py_images_per_s']:.1f}",
                f"{a['bare_fused_images_per_s']:.1f} bare loop",
                f"{a['ratio_same_optimizer']:.3f}x",
                f"+{a['extra_ms_per_step']:.1f} ms/step",
            )
        )
    for key, value, goal in (("b", b, ">= 25x cold, >= 40x warm"), ("s", short, ">= 5x")):
        if value:
            rows.append(
                (
                    f"{key}) {value['folds']}-fold frozen sweep, {value['epochs']} epochs (s)",
                    f"cache on {value['on_cold_s']:.1f} cold, {value['on_warm_s']:.1f} warm",
                    f"cache off {value['off_s']:.1f}",
                    f"{value['speedup_cold']:.1f}x cold, {value['speedup_warm']:.1f}x warm",
                    goal,
                )
            )
            fixed = value["fixed_s_per_job"]
            rows.append(
                (
                    f"{key}) fixed cost per job, warm cache (s)",
                    ", ".join(f"{x:.2f}" for x in fixed["on_warm"]),
                    "cold " + ", ".join(f"{x:.2f}" for x in fixed["on_cold"]),
                    f"median {statistics.median(fixed['on_warm'][1:] or fixed['on_warm']):.2f}",
                    "<= 0.5 s",
                )
            )
    if r:
        rows.append(
            (
                "r) (b) warm with MLflow: new store, again (s)",
                f"{r['first']['seconds']:.1f}, {r['again']['seconds']:.1f}",
                "",
                "",
                f"ensembles {r['first']['ensembles_registered']}, {r['again']['ensembles_registered']}",
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
    if f:
        rows.append(
            (
                "f) make demo on disk (MB, du)",
                f"{f['repo_mb']:.0f}",
                f"user cache {f['user_cache_mb']:.0f}",
                "",
                "<= 600",
            )
        )
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    for key, value in (("a", a), ("b", b), ("s", short), ("r", r), ("c", c), ("f", f)):
        if value:
            print(f"{key}) {value['setting']}")


def main() -> None:
    global MAX_WAIT_S, THREADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "benchmark", help="scratch folder")
    parser.add_argument("--out", type=Path, help="JSON results (default: <workdir>/results.json)")
    parser.add_argument("--only", default="a,b,s,r,c,d,f", help="comma-separated steps; c scores the model b exported")
    parser.add_argument("--sweep-per-class", type=int, default=20, help="images per digit class in the sweep (b)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of (a) and (c)")
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
    sweep_data, short_data = work / "sweep_subset", work / "sweep_subset_short"
    n_sweep = subset(digits / "train", sweep_data, per_class)
    n_short = subset(digits / "train", short_data, 5 if args.quick else 24)
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
        results["sweep"] = sweep(work, sweep_data, n_sweep, 5, epochs_b, size_b, "b")
    if "s" in steps:
        print(f"s) 2-fold sweep on {n_short} images at {size_b} px with MLflow: cache off, cold, warm ...", flush=True)
        results["sweep_short"] = sweep(work, short_data, n_short, 2, 2 if args.quick else 4, size_b, "s", mlflow=True)
    if "r" in steps:
        if not (work / "feature-cache-b").is_dir():
            raise SystemExit("step r reuses the feature cache that step b fills: add b to --only")
        print("r) the sweep of (b) with MLflow, warm cache: into a new store, then again ...", flush=True)
        results["resweep"] = resweep(work, sweep_data, 5, epochs_b, size_b)
    if "c" in steps:
        print("c) inference: test.py vs bare ...", flush=True)
        results["inference"] = inference(work, ckpt, digits / "test", size_b, rounds)
    if "f" in steps:
        print("f) make demo: 5-fold sample sweep with MLflow, test.py of the champion, du ...", flush=True)
        results["disk"] = disk(work, digits / "train", digits / "test", args.quick)
    out = args.out or work / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
