"""Every exception llmtune raises on purpose, in one place.

Each message says what is wrong, where (file, column, row, value) and what to do.
"""

from __future__ import annotations

__all__ = ["LLMTuneError", "DataError", "ConfigError", "CheckpointError", "TrainingError"]


class LLMTuneError(Exception):
    """Base class of llmtune's own errors."""


class DataError(LLMTuneError, ValueError):
    """The input data cannot be used: missing column, bad label, empty set, unreadable file."""


class ConfigError(LLMTuneError, ValueError):
    """Arguments that contradict each other or the model (labels, num_labels, precision...)."""


class CheckpointError(LLMTuneError):
    """A checkpoint is missing, unreadable, or belongs to a different model or label set."""


class TrainingError(LLMTuneError, RuntimeError):
    """Training cannot continue, e.g. the loss or a gradient became NaN or infinite."""
