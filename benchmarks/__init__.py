"""Speed benchmarks: `python benchmarks/run.py` (CPU, everything) and `python benchmarks/gpu_check.py` (GPU)."""
