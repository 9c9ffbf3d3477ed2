"""MLflow: `MLflowLogger` logs through `mlflow.MlflowClient`, by default into a local SQLite store."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .base import ExperimentLogger, require

if TYPE_CHECKING:
    from ..trainer import TrainState

__all__ = ["MLflowLogger"]

_PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter's value


class MLflowLogger(ExperimentLogger):
    """Log a run to MLflow: hyperparameters as params, metrics by step, the model as artifacts.

    Metrics as described in `ExperimentLogger`. It talks to the store through an explicit
    `MlflowClient`, leaving MLflow's global active run (`mlflow.start_run`) to your code.
    Each fit makes a new run in `experiment`; a fit resumed from a `Checkpoint` continues the
    same run (its id is in the checkpoint), and the steps the interrupted fit had already
    logged are not logged again. The run ends FINISHED, or FAILED when fit raises.

    Args:
        tracking_uri: the store; None: MLflow's own choice (`MLFLOW_TRACKING_URI`, else
            `sqlite:///mlflow.db` in the working directory; open it with
            `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
        experiment: the experiment's name, made if missing.
        run_name: the run's name; None lets MLflow pick one.
        log_every: log the training loss and learning rate every this many steps.

    Raises:
        ImportError: mlflow is not installed (`pip install llmtune[tracking]`).

    Example:
        >>> logger = MLflowLogger(experiment="tweets")  # doctest: +SKIP
        >>> FineTuner(model, callbacks=[logger]).fit(train, val)  # doctest: +SKIP
        >>> logger.log_model(model)  # the fitted model's directory as the run's artifacts  # doctest: +SKIP
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "llmtune",
        run_name: str | None = None,
        *,
        log_every: int = 10,
    ) -> None:
        require("mlflow", "MLflowLogger")
        super().__init__(log_every)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id: str | None = None  # the current (or last) fit's run: restored when a fit resumes
        self.client: Any = None
        self.logged: dict[str, int] = {}  # metric -> last step in the store, for a resumed run

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state["run_id"]
        self.tracking_uri = self.tracking_uri or state["tracking_uri"]

    def forget(self) -> None:
        self.run_id = None

    def resuming(self) -> bool:
        return self.run_id is not None

    def _client(self) -> Any:
        if self.client is None:
            import mlflow
            from mlflow import MlflowClient

            self.tracking_uri = self.tracking_uri or mlflow.get_tracking_uri()  # resolved: an absolute path
            self.client = MlflowClient(self.tracking_uri)
        return self.client

    def start(self, state: TrainState, resumed: bool) -> None:
        client = self._client()
        if resumed:
            client.update_run(self.run_id, status="RUNNING")
            metrics = client.get_run(self.run_id).data.metrics
            self.logged = {k: max(m.step for m in client.get_metric_history(self.run_id, k)) for k in metrics}
            return
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name).info.run_id
        self.logged = {}

    def log_hyperparameters(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(k, str(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params a batch
            self._client().log_batch(self.run_id, params=entries[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # A resumed fit repeats the steps between its checkpoint and the interruption: the
        # store has them already (the same values: the resume is exact), so they are left out.
        entries = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if entries:
            self._client().log_batch(self.run_id, metrics=entries)

    def finish(self, failed: bool) -> None:
        self._client().set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def log_model(self, model: Any, artifact_path: str = "model") -> None:
        """Log a model directory as the last run's artifacts: `model` saved with `save_pretrained`, or a path.

        Call it after `fit` returns, so that the weights are the ones kept (the best epoch's,
        restored by `KeepBest` at the fit's end). Does nothing on ranks other than 0.

        Raises:
            ConfigError: no fit has logged a run yet.
        """
        if self.active is False:  # a rank other than 0
            return
        if self.run_id is None:
            raise ConfigError("MLflowLogger.log_model has no run to log to; call it after fit().")
        if isinstance(model, (str, os.PathLike)):
            self._client().log_artifacts(self.run_id, str(model), artifact_path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / artifact_path
            model.save_pretrained(directory)
            self._client().log_artifacts(self.run_id, str(directory), artifact_path)
