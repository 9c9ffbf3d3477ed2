"""llmtune: fine-tune pretrained transformer encoders for text classification and regression.

Five pieces that you wire together: DatasetAdapter (data), ClassifierModel (encoder + head),
Objective (loss), OptimizerFactory (optimizer + schedule) and FineTuner (the loop).
"""

from .callbacks import Callback, EarlyStopping, HistoryLogger, KeepBest, ProgressBar
from .data import DatasetAdapter
from .errors import CheckpointError, ConfigError, DataError, LLMTuneError, TrainingError
from .model import ClassifierModel
from .objectives import BinaryCrossEntropy, CrossEntropy, MeanSquaredError, Objective
from .optim import OptimizerFactory
from .trainer import FineTuner, History, TrainState

__version__ = "0.1.0"

__all__ = [
    "DatasetAdapter",
    "ClassifierModel",
    "Objective",
    "OptimizerFactory",
    "FineTuner",
    "CrossEntropy",
    "MeanSquaredError",
    "BinaryCrossEntropy",
    "Callback",
    "ProgressBar",
    "EarlyStopping",
    "KeepBest",
    "HistoryLogger",
    "History",
    "TrainState",
    "LLMTuneError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "TrainingError",
]
