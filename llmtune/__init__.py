"""llmtune: fine-tune pretrained transformer encoders for text classification and regression.

Five pieces that you wire together: DatasetAdapter (data), ClassifierModel (encoder + head),
Objective (loss), OptimizerFactory (optimizer + schedule) and FineTuner (the loop).
Tuning strategies (Full, HeadOnly, TopLayers, BitFit, LoRA) choose which parameters train.
"""

from .callbacks import Callback, EarlyStopping, HistoryLogger, KeepBest, ProgressBar
from .checkpoint import Checkpoint
from .data import DatasetAdapter
from .errors import CheckpointError, ConfigError, DataError, LLMTuneError, TrainingError
from .loggers import ExperimentLogger, MLflowLogger, TensorBoardLogger
from .model import ClassifierModel
from .objectives import BinaryCrossEntropy, CrossEntropy, MeanSquaredError, Objective
from .optim import OptimizerFactory
from .trainer import FineTuner, History, TrainState
from .tuning import BitFit, Full, HeadOnly, LoRA, ParameterCounts, TopLayers, TuningStrategy, count_parameters

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
    "Checkpoint",
    "ExperimentLogger",
    "TensorBoardLogger",
    "MLflowLogger",
    "History",
    "TrainState",
    "TuningStrategy",
    "Full",
    "HeadOnly",
    "TopLayers",
    "BitFit",
    "LoRA",
    "ParameterCounts",
    "count_parameters",
    "LLMTuneError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "TrainingError",
]
