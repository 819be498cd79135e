"""A Hydra callback that times each job of a sweep. It imports neither torch nor Lightning: Hydra creates it
before the first job, and importing them here would move their import out of the job, where train.py does it
(with src.runtime's settings), into the sweep's set-up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

IN_STEPS = {"seconds": 0.0, "steps": 0}  # benchmarks.arms.StepTimer adds, JobTimer reads: both in the job's process


class JobTimer(HydraCallback):
    """One JSON line per Hydra job: its wall time (Hydra's job start to job end, so the first job includes the
    imports train.py does in it), the seconds inside training and validation steps (StepTimer), and the rest,
    the job's fixed cost.

    Added as `+hydra.callbacks.job_timer={_target_:benchmarks.job_timer.JobTimer,path:...}`.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        IN_STEPS.update(seconds=0.0, steps=0)
        self.start = time.perf_counter()

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        wall = time.perf_counter() - self.start
        row = {"wall_s": wall, "step_s": IN_STEPS["seconds"], "steps": IN_STEPS["steps"]}
        with self.path.open("a") as f:
            f.write(json.dumps({**row, "fixed_s": wall - row["step_s"]}) + "\n")
