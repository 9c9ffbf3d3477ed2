"""Experiment loggers: callbacks that send a run's settings and metrics to a tracker.

One small base (`ExperimentLogger`) holds what every tracker shares; each tracker is one small
file over it. A tracker's library is imported only when a run logs to it, so `import llmtune`
stays light: install them with `pip install llmtune[tracking]`.
"""

from .base import ExperimentLogger
from .mlflow import MLflowLogger
from .tensorboard import TensorBoardLogger

__all__ = ["ExperimentLogger", "TensorBoardLogger", "MLflowLogger"]
