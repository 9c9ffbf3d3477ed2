"""Loading a model directory (or Hub name) for `ClassifierModel.from_pretrained`, refusing what is wrong.

Every way a directory can hand back a wrong model without a word is checked here: no
tokenizer files, encoder weights missing or left over, damaged files, NaN weights, a head
file from a newer llmtune, and a mistyped local path sent to the Hub.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ._guard import nonfinite_weights
from .errors import CheckpointError, ConfigError

logger = logging.getLogger("llmtune")

HEAD_CONFIG = "llmtune_head.json"
HEAD_WEIGHTS = "llmtune_head.safetensors"
HEAD_FORMAT = 1  # version of llmtune_head.json; files before it carried none (read as 0)
# Files any transformers tokenizer is built from (tokenizer_config.json alone builds nothing).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report and progress bars off: llmtune checks the load itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def local_or_hub(name_or_dir: str | os.PathLike) -> str:
    """The source as given, after refusing a local path that does not exist.

    A Hub id is "name" or "org/name"; anything else that is not a directory here (a path
    starting with ".", "/" or "~", more than one "/", or one under an existing directory)
    is a mistyped path, which the Hub would spend its retries on before failing.
    """
    source = str(name_or_dir)
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    parts = source.replace("\\", "/").split("/")
    looks_local = (
        source.startswith((".", "/", "~")) or "\\" in source or len(parts) > 2 or Path(parts[0]).is_dir()
    )
    if looks_local or isinstance(name_or_dir, os.PathLike):
        raise ConfigError(f"{source}: no such directory (a Hub id is 'name' or 'org/name').")
    return source


def adapter_base(name_or_dir: str | os.PathLike, tuning: dict[str, Any], base: Any) -> Any:
    """Where the encoder weights come from: the directory itself, or a LoRA adapter's base."""
    if tuning.get("name") != "LoRA":
        if base is not None:
            raise ConfigError(f"base= is for LoRA adapter directories; {name_or_dir} holds a full model")
        return name_or_dir
    source = base or tuning.get("base_model")
    if not source:
        raise ConfigError(
            f"{name_or_dir} holds a LoRA adapter without a record of its base encoder; "
            "pass base=<the encoder's name or directory>"
        )
    return source


def read_head(directory: str) -> dict[str, Any] | None:
    """llmtune's head record in a saved model directory (None for a plain encoder)."""
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read ({err}); the model directory is damaged.") from None
    version = saved.get("format", 0)
    if version > HEAD_FORMAT:
        raise CheckpointError(
            f"{path}: written by a newer llmtune (head format {version}, this one reads up to "
            f"{HEAD_FORMAT}); upgrade llmtune to load it."
        )
    saved.setdefault("pooling", "cls")  # format 0 files of the first release had no pooling
    return saved


# from_pretrained options that decide how weights load, not which weights the config holds.
LOADING_OPTIONS = frozenset(
    {"dtype", "torch_dtype", "device_map", "quantization_config", "low_cpu_mem_usage", "attn_implementation"}
)

_PLAIN_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")  # a tokenizer.json, nothing more


def _saved_as_plain_fast(source: str) -> bool:
    config = Path(source) / "tokenizer_config.json"
    if not (config.is_file() and (Path(source) / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("tokenizer_class") in _PLAIN_FAST
    except (OSError, ValueError):
        return False


def load_tokenizer(source: str, vocab_size: int | None) -> Any:
    """The tokenizer of `source`, refused when a directory has no tokenizer files or it is
    far smaller than the encoder's vocabulary (every word would become [UNK])."""
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{source} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the "
            "tokenizer there too (tokenizer.save_pretrained), or every word would become [UNK]."
        )
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            if _saved_as_plain_fast(source) and type(tokenizer).__name__ not in _PLAIN_FAST:
                # transformers 5 rebuilds such a tokenizer as the model type's own class (a
                # WordPiece tokenizer saved beside a Qwen2 model came back as byte-level BPE):
                # load exactly the tokenizer.json that was saved.
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    except Exception as err:
        if not (Path(source).is_dir() and _is_damage(err)):
            raise  # a Hub name, or a wrong argument: transformers' own error says what went wrong
        raise CheckpointError(
            f"{source}: cannot read its tokenizer ({type(err).__name__}: {err}); the directory is "
            "damaged: save the tokenizer there again."
        ) from err
    if vocab_size and len(tokenizer) < vocab_size // 2:
        raise ConfigError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary "
            f"{vocab_size}: they do not belong together; save the encoder's own tokenizer there."
        )
    return tokenizer


def quantization_config(quantization: str) -> Any:
    """A bitsandbytes config for 4-bit (NF4, bf16 compute, as in QLoRA) or 8-bit weights.

    Raises:
        ConfigError: an unknown kind, no CUDA GPU, or bitsandbytes is not installed.
    """
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    if quantization not in ("4bit", "8bit"):
        raise ConfigError(f"quantization must be '4bit', '8bit' or None, got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes")
    if not torch.cuda.is_available():
        raise ConfigError(f"{quantization} loading runs on a CUDA GPU (bitsandbytes); there is none here.")
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_encoder(source: str, quantization: str | None = None, **kwargs: Any) -> nn.Module:
    """`AutoModel.from_pretrained(source)` without a pooler, refusing missing or stray weights.

    Weights of other heads in the checkpoint (a masked-LM head, a pooler, a classifier) are
    dropped on purpose; a missing encoder weight, or one the encoder has no place for (the
    saved config says 2 layers, the file holds 3), is an error, as transformers would
    otherwise initialise or drop it silently. Config values passed in `kwargs`
    (`num_hidden_layers=2`) may leave weights out on purpose.
    """
    from transformers import AutoConfig, AutoModel

    if quantization is not None:
        import torch

        kwargs = {"quantization_config": quantization_config(quantization), **kwargs}
        if "device_map" not in kwargs:
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    with quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(source, **_hub_options(kwargs))
            cls = AutoModel._model_mapping[type(config)]
            if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
                kwargs = {"add_pooling_layer": False, **kwargs}
            encoder, info = AutoModel.from_pretrained(source, output_loading_info=True, **kwargs)
        except Exception as err:
            if Path(source).is_dir() and _is_damage(err):
                raise CheckpointError(
                    f"{source}: cannot read ({type(err).__name__}: {err}); the model directory is damaged."
                ) from None
            raise
    own = {name for name, _ in encoder.named_children()}
    stray = sorted(k for k in info["unexpected_keys"] if k.split(".")[0] in own)
    # A config changed on purpose (num_hidden_layers=2 keeps the first two layers) leaves
    # weights out by design; only a config as saved must fit its weights exactly.
    # Loading options (dtype=...) are config attributes in transformers 5 but change no shape.
    reshaped = "config" in kwargs or any(k not in LOADING_OPTIONS and hasattr(config, k) for k in kwargs)
    if reshaped and stray:
        logger.info("%s: %d weights left out by the config given (%s)", source, len(stray), stray[0])
        stray = []
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
    if missing or stray or mismatched:
        raise CheckpointError(
            f"{source}: the encoder weights do not fit its config ({config.model_type}, "
            f"{getattr(config, 'num_hidden_layers', '?')} layers): "
            + "; ".join(
                f"{what} {keys[:5]}{' and more' if len(keys) > 5 else ''}"
                for what, keys in (
                    ("missing", missing),
                    ("not in the model", stray),
                    ("other shape", mismatched),
                )
                if keys
            )
            + ". transformers would initialise the missing ones at random; fix or re-save the directory."
        )
    dropped = sorted(set(info["unexpected_keys"]) - set(stray))
    if dropped:
        logger.debug("dropped weights of other heads from %s: %s", source, dropped[:5])
    return encoder


def _hub_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    keys = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
    return {k: v for k, v in kwargs.items() if k in keys}


def _is_damage(err: Exception) -> bool:
    """A file that exists but does not read: damage, not a wrong argument."""
    from safetensors import SafetensorError

    return isinstance(err, (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, EOFError)) or (
        isinstance(err, (OSError, RuntimeError, ValueError)) and "safetensors" in str(err).lower()
    )


def load_head(head: nn.Module, directory: str) -> None:
    """Load the head's saved weights into `head`, naming the file when it does not read or fit."""
    from safetensors.torch import load_file

    path = Path(directory) / HEAD_WEIGHTS
    try:
        head.load_state_dict(load_file(path))
    except Exception as err:  # a damaged file fails in several ways; all mean the same
        raise CheckpointError(
            f"{path}: cannot read ({type(err).__name__}: {err}); the model directory is damaged."
        ) from None


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse NaN or inf weights: such a model predicts one label for everything, silently."""
    bad = nonfinite_weights(model)
    if bad:
        raise CheckpointError(f"{source}: weights {bad[:5]} hold NaN or inf; the model directory is damaged.")
