"""TensorBoard: `TensorBoardLogger` writes event files with torch's `SummaryWriter`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import ExperimentLogger, require

if TYPE_CHECKING:
    from ..trainer import TrainState

__all__ = ["TensorBoardLogger"]


def _next_version(log_dir: Path) -> str:
    taken = [
        int(m.group(1)) for p in log_dir.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return f"version_{max(taken, default=-1) + 1}"


def _plain(value: Any) -> Any:
    """What the hparams plugin stores: numbers, strings and booleans; anything else as its text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardLogger(ExperimentLogger):
    """Log a run to TensorBoard event files in `log_dir/<run_name>`; view with `tensorboard --logdir log_dir`.

    Scalars as described in `ExperimentLogger`; the hyperparameters go to the HPARAMS tab
    (with the validation metrics as its columns) and, as a table, to the TEXT tab. Each fit
    writes a new run `version_N` unless `run_name` names one. A fit resumed from a
    `Checkpoint` writes on in the same run, and TensorBoard hides what the interrupted
    fit logged after the checkpoint (`SummaryWriter(purge_step=...)`), so no step shows twice.

    Args:
        log_dir: the directory holding the runs.
        run_name: the run's subdirectory; None: `version_0`, `version_1`, ... in turn.
        log_every: log the training loss and learning rate every this many steps.

    Raises:
        ImportError: tensorboard is not installed (`pip install llmtune[tracking]`).

    Example:
        >>> FineTuner(model, callbacks=[TensorBoardLogger("runs")]).fit(train, val)  # doctest: +SKIP
    """

    def __init__(
        self, log_dir: str | os.PathLike = "runs", *, run_name: str | None = None, log_every: int = 10
    ):
        require("tensorboard", "TensorBoardLogger")
        super().__init__(log_every)
        self.log_dir, self.run_name = Path(log_dir), run_name
        self.run: str | None = None  # the run this fit writes: restored when a fit resumes
        self.writer: Any = None

    @property
    def run_dir(self) -> Path | None:
        """Where the current (or last) fit's events are, or None before the first one."""
        return None if self.run is None else self.log_dir / self.run

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run = state["run"]

    def forget(self) -> None:
        self.run = None

    def resuming(self) -> bool:
        return self.run is not None

    def start(self, state: TrainState, resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.run is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.run = self.run_name or _next_version(self.log_dir)
        # Events the interrupted fit wrote after its checkpoint (steps > state.step) are purged.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=state.step + 1 if resumed else None)

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {k: _plain(v) for k, v in params.items()}
        # Into this run's own file: SummaryWriter.add_hparams would open a run of its own.
        for summary in hparams(values, dict.fromkeys(self.metric_names, 0.0)):
            self.writer.file_writer.add_summary(summary)
        table = "\n".join(
            ["| setting | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in values.items())]
        )
        self.writer.add_text("hyperparameters", table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, failed: bool) -> None:
        self.writer.close()
        self.writer = None
