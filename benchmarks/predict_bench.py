"""Speed of the prediction path (predict.py / test.py / the served model) against bare PyTorch, on this machine.

    python benchmarks/predict_bench.py              # ~160 digits at 224 px, a few minutes on 2 CPU cores
    python benchmarks/predict_bench.py --quick      # a smoke run; its numbers mean little

1) forward pass alone, ResNet18 at 224 px, batch 32: eager, channels_last, onnxruntime (random input)
2) prediction stage (decode, transform, forward, mean of softmax) of src.serving.files.predict_files, which
   predict.py and test.py run, for an ensemble of 1 and of 5, with each runtime, against a bare loop: a Dataset
   over the same files with training's transform, a DataLoader with the same workers, and eager
   `torch.inference_mode` over the k networks.

Weights are random (same cost as trained ones). The arms alternate over --rounds rounds and each keeps its best;
each measurement first waits (up to --max-wait s) for idle CPUs, as benchmarks/run.py does, and records
`os.getloadavg()`, since other people's jobs share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from benchmarks import run as bench  # noqa: E402
from src.data import build_transform, load_image, make_loader, resolve_num_workers  # noqa: E402
from src.model import save_model_file  # noqa: E402
from src.sample_data import write_digits  # noqa: E402
from src.serving import Predictor, preprocessing_from_meta  # noqa: E402
from src.serving.ensemble_model import load_model_file  # noqa: E402
from src.serving.files import predict_files  # noqa: E402
from src.serving.onnx_model import onnx_nets  # noqa: E402

CLASSES = [str(d) for d in range(10)]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load() -> float:
    """Wait (up to --max-wait s) for other processes to leave the CPUs idle, then the 1-minute load average."""
    bench.settle(0.25)
    return round(os.getloadavg()[0], 2)


def best_rate(fn: Callable[[], int], repeats: int) -> tuple[float, list[float]]:
    """Images/s of the fastest of `repeats` calls (after one warm-up), and the load average before each call."""
    fn()
    rates, loads = [], []
    for _ in range(repeats):
        loads.append(load())
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return max(rates), loads


def forward_only(batch: int, size: int, repeats: int, cache: Path) -> dict[str, Any]:
    """(1): the network alone on a random batch held in memory."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    x = torch.randn(batch, 3, size, size)
    meta = {"classes": CLASSES, "image_size": size, "mean": MEAN, "std": STD}
    channels_last = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
    channels_last.load_state_dict(net.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    (ort,) = onnx_nets([net], meta, cache)

    def run(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], int]:
        def call() -> int:
            with torch.inference_mode():
                f(x)
            return batch

        return call

    arms = {"eager": run(net), "channels_last": run(channels_last), "onnxruntime": run(ort)}
    out: dict[str, Any] = {}
    for name, fn in arms.items():
        rate, loads = best_rate(fn, repeats)
        out[name] = {"images_per_s": rate, "load_before": loads}
    return out


class Files(Dataset):
    """The bare baseline's dataset: decode with training's loader, transform with training's transform."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.transform = paths, build_transform(size, mean=MEAN, std=STD)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def bare_loop(files: list[Path], paths: list[Path], size: int, batch: int, workers: int) -> Callable[[], int]:
    nets = [load_model_file(f)[0] for f in files]

    def call() -> int:  # a new loader per call, as predict_files (and a script run once) starts its workers
        n = 0
        with torch.inference_mode():
            for x in make_loader(Files(paths, size), batch, workers):
                torch.stack([net(x).softmax(1) for net in nets]).mean(0)
                n += len(x)
        return n

    return call


def ours(predictor: Predictor, paths: list[Path], batch: int, workers: int) -> Callable[[], int]:
    def call() -> int:
        return len(predict_files(predictor, paths, batch, workers, progress=False).indices)

    return call


def prediction_stage(work: Path, paths: list[Path], size: int, batch: int, rounds: int, cache: Path) -> dict[str, Any]:
    """(2): predict_files with each runtime vs the bare loop, ensembles of 1 and 5."""
    workers = resolve_num_workers("auto")
    meta = {"backbone": "resnet18", "classes": CLASSES, "image_size": size, "mean": MEAN, "std": STD}
    files = []
    for k in range(5):
        torch.manual_seed(k)
        net = torchvision.models.resnet18(num_classes=len(CLASSES)).eval()
        files.append(save_model_file(work / f"fold_{k}.pth", net.state_dict(), {**meta, "fold": k}))
    preprocessing = preprocessing_from_meta(meta)
    results: dict[str, Any] = {"workers": workers}
    for k in (1, 5):
        nets = [load_model_file(f)[0] for f in files[:k]]
        start = time.perf_counter()
        onnx = onnx_nets(nets, meta, cache)
        export_s = time.perf_counter() - start
        arms = {
            "bare_eager": bare_loop(files[:k], paths, size, batch, workers),
            "torch_eager": ours(Predictor(nets, CLASSES, preprocessing, channels_last=False), paths, batch, workers),
            "torch_channels_last": ours(Predictor(nets, CLASSES, preprocessing), paths, batch, workers),
            "onnxruntime": ours(Predictor(onnx, CLASSES, preprocessing, device="cpu"), paths, batch, workers),
        }
        if k > 1:
            del arms["torch_eager"]
        rates: dict[str, list[float]] = {name: [] for name in arms}
        loads: dict[str, list[float]] = {name: [] for name in arms}
        for fn in arms.values():
            fn()  # warm-up: first-call allocations, the page cache of the images
        for _ in range(rounds):
            for name, fn in arms.items():
                loads[name].append(load())
                start = time.perf_counter()
                rates[name].append(fn() / (time.perf_counter() - start))
        results[f"ensemble_of_{k}"] = {
            "onnx_export_s_if_not_cached": export_s,
            **{name: {"images_per_s": max(rates[name]), "load_before": loads[name]} for name in arms},
        }
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prediction benchmark, {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}")
    for column in ("measure", "arm", "images/s", "vs fastest", "load avg before"):
        table.add_column(column, justify="left" if column in ("measure", "arm") else "right")
    f = results["forward"]
    fastest = max(v["images_per_s"] for v in f.values())
    for name, v in f.items():
        loads = ", ".join(f"{x:.1f}" for x in v["load_before"])
        table.add_row(
            "1) forward, batch 32", name, f"{v['images_per_s']:.1f}", f"{v['images_per_s'] / fastest:.2f}x", loads
        )
    for key in ("ensemble_of_1", "ensemble_of_5"):
        stage = results["prediction"][key]
        arms = {k: v for k, v in stage.items() if isinstance(v, dict)}
        fastest = max(v["images_per_s"] for v in arms.values())
        for name, v in arms.items():
            loads = ", ".join(f"{x:.1f}" for x in v["load_before"])
            ratio = f"{v['images_per_s'] / fastest:.2f}x"
            table.add_row(f"2) predict_files, {key.replace('_', ' ')}", name, f"{v['images_per_s']:.1f}", ratio, loads)
        table.add_row("", f"(ONNX export, uncached: {stage['onnx_export_s_if_not_cached']:.1f} s)", "", "", "")
    Console(width=150).print(table)
    print(results["setting"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "benchmark", help="scratch folder")
    parser.add_argument("--out", type=Path, help="JSON results (default: <workdir>/predict_results.json)")
    parser.add_argument("--images", type=int, default=160, help="digits test images to predict")
    parser.add_argument("--size", type=int, default=224, help="image size (resize + crop)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the prediction arms")
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for idle CPUs per measurement")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check that every step runs")
    args = parser.parse_args()
    bench.MAX_WAIT_S = args.max_wait
    n_images, size, rounds, repeats = (24, 64, 1, 1) if args.quick else (args.images, args.size, args.rounds, 3)
    work = args.workdir.resolve()
    digits = work / "digits"
    if not (digits / "test").is_dir():
        write_digits(digits)
    paths = sorted((digits / "test").rglob("*.png"))
    paths = paths[:: max(1, len(paths) // n_images)][:n_images]  # every digit appears
    batch = 32
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cache = Path(tmp) / "onnx"  # empty caches: the export times are the uncached cost
        results: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            },
            "setting": f"ResNet18 (random init), {size} px, batch {batch}, {len(paths)} digits test images, "
            f"forward best of {repeats}, prediction stage best of {rounds} alternating rounds",
            "quick": args.quick,
        }
        print("1) forward pass: eager, channels_last, onnxruntime ...", flush=True)
        results["forward"] = forward_only(batch, size, repeats, cache)
        print("2) prediction stage: predict_files vs bare loop, ensembles of 1 and 5 ...", flush=True)
        results["prediction"] = prediction_stage(Path(tmp), paths, size, batch, rounds, Path(tmp) / "onnx-stage")
    out = args.out or work / "predict_results.json"
    out.write_text(json.dumps(results, indent=2))
    print_table(results)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
