"""Lightning's MLflow logger for fold runs (its own module: it imports Lightning, and ddp_spawn pickles it)."""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class FoldLogger(MLFlowLogger):
    """Lightning's MLflow logger, except that the end of `fit` does not close the run:
    the fold run stays RUNNING until its model, reports and registration are logged."""

    def finalize(self, status: str = "success") -> None:
        return None
