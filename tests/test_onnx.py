"""ONNX export: onnxruntime's outputs equal predict_proba (fp32, within 1e-4) for every task, on
BERT-, RoBERTa- and DistilBERT-style models, a merged LoRA model and a decoder; the loader
predicts without importing torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from families import tiny_backbone

from llmtune import ClassifierModel, ConfigError, LoRA

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import llmtune_onnx  # noqa: E402
from llmtune.onnx import quantize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "good",
    "the film was a superb story and the acting was fine",
    "awful " * 40,  # longer than max_length: truncated alike on both sides
    "the plot was weak, the music dull",
    "a",
    "very very good and lovely",
]
LABELS = {
    "classification": ["neg", "neutral", "pos"],
    "multilabel": ["plot", "music", "cast"],
    "regression": None,
}


def build(tokenizer, family, task):
    encoder = tiny_backbone(family, len(tokenizer), tokenizer.pad_token_id)
    return ClassifierModel(encoder, tokenizer, labels=LABELS[task], task=task, max_length=24, seed=1)


def reference(model, texts, pairs=None):
    if model.task == "regression":
        return model.logits(texts, pairs, precision="fp32")
    return model.predict_proba(texts, pairs, precision="fp32")


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_onnxruntime_gives_what_predict_proba_gives(tokenizer, tmp_path, family, task):
    model = build(tokenizer, family, task)
    model.export_onnx(tmp_path / "onnx")
    assert model.training  # exported in eval mode, handed back as it was
    meta = json.loads((tmp_path / "onnx" / "llmtune_onnx.json").read_text())
    assert meta["task"] == task and meta["labels"] == LABELS[task]
    assert meta["output"] == ("values" if task == "regression" else "probabilities")
    exported = llmtune_onnx.load(tmp_path / "onnx")
    np.testing.assert_allclose(exported.outputs(TEXTS), reference(model, TEXTS), atol=1e-4)
    np.testing.assert_allclose(exported.outputs(TEXTS[:1]), reference(model, TEXTS[:1]), atol=1e-4)  # batch 1
    expected = model.predict(TEXTS, precision="fp32")
    assert exported.predict(TEXTS) == (
        pytest.approx(expected, abs=1e-4) if task == "regression" else expected
    )
    pairs = TEXTS[::-1]
    np.testing.assert_allclose(exported.outputs(TEXTS, pairs), reference(model, TEXTS, pairs), atol=1e-4)


def test_a_merged_lora_model_exports(model_dir, tmp_path):
    pytest.importorskip("peft")
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained-looking adapter: merging it changes the weights
    before = reference(model, TEXTS)
    model.merge().export_onnx(tmp_path / "onnx")
    np.testing.assert_allclose(llmtune_onnx.load(tmp_path / "onnx").outputs(TEXTS), before, atol=1e-4)


def test_a_grown_vocabulary_exports_and_reads_its_new_tokens(tokenizer, tmp_path):
    model = build(tokenizer, "bert", "classification")
    chinese = ["the film 很好", "真差 plot", "很好看", "太差了"] * 3
    assert model.extend_vocabulary(chinese)
    with torch.no_grad():  # trained-looking new rows: the texts' outputs differ by them
        model.encoder.get_input_embeddings().weight[len(tokenizer) :].normal_(0, 1)
    model.export_onnx(tmp_path / "onnx")
    outputs = llmtune_onnx.load(tmp_path / "onnx").outputs(chinese[:4])
    np.testing.assert_allclose(outputs, reference(model, chinese[:4]), atol=1e-4)
    assert not np.allclose(outputs[0], outputs[1])


def test_a_decoder_exports_with_left_padding(tokenizer, tmp_path):
    tokenizer = _left(tokenizer)  # the session's tokenizer stays right-padded
    model = build(tokenizer, "llama", "classification")
    assert model.pooling == "last"
    model.export_onnx(tmp_path / "onnx")
    exported = llmtune_onnx.load(tmp_path / "onnx")
    assert exported.pad_left
    np.testing.assert_allclose(exported.outputs(TEXTS), reference(model, TEXTS), atol=1e-4)


def test_an_empty_text_and_the_truncation_side_read_as_in_torch(bpe_tokenizer, tokenizer, tmp_path):
    model = build(bpe_tokenizer, "gpt2", "classification")  # "" is no tokens to this tokenizer
    model.export_onnx(tmp_path / "bpe")
    exported = llmtune_onnx.load(tmp_path / "bpe")
    for texts in ([""], ["", "good", "", "the plot was weak"]):
        np.testing.assert_allclose(exported.outputs(texts), reference(model, texts), atol=1e-4)
    import copy

    keep_end = copy.deepcopy(tokenizer)
    keep_end.truncation_side = "left"  # a long text keeps its end
    model = build(keep_end, "bert", "classification")
    model.export_onnx(tmp_path / "left")
    texts = ["good lovely superb " + "awful " * 40, "awful " * 40 + "good lovely superb"]
    np.testing.assert_allclose(
        llmtune_onnx.load(tmp_path / "left").outputs(texts), reference(model, texts), atol=1e-4
    )


def _left(tokenizer):
    import copy

    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    return left


def test_the_loader_predicts_without_torch_and_int8_stays_close(tokenizer, tmp_path):
    model = build(tokenizer, "bert", "classification")
    model.export_onnx(tmp_path / "onnx")
    int8 = quantize(tmp_path / "onnx")
    assert int8.stat().st_size < (tmp_path / "onnx" / "model.onnx").stat().st_size
    code = (
        "import sys, json, llmtune_onnx\n"
        f"model = llmtune_onnx.load({str(tmp_path / 'onnx')!r}, threads=1)\n"
        f"int8 = llmtune_onnx.load({str(tmp_path / 'onnx')!r}, quantized=True)\n"
        f"texts = {TEXTS!r}\n"
        "out = {'labels': model.predict(texts), 'fp32': model.predict_proba(texts).tolist(),\n"
        "       'int8': int8.predict_proba(texts).tolist(),\n"
        "       'heavy': [m for m in ('torch', 'transformers', 'llmtune') if m in sys.modules]}\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["labels"] == model.predict(TEXTS, precision="fp32")
    np.testing.assert_allclose(out["fp32"], reference(model, TEXTS), atol=1e-4)
    np.testing.assert_allclose(out["int8"], out["fp32"], atol=0.05)


def test_export_refuses_a_directory_of_other_files(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an ONNX export"):
        build(tokenizer, "bert", "classification").export_onnx(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


OTHER_FAMILIES = ["deberta-v2", "electra", "albert", "xlm-roberta", "modernbert", "qwen2", "gemma", "gpt2"]


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_every_family_exports(tokenizer, tmp_path, family):
    model = build(tokenizer, family, "classification")
    model.export_onnx(tmp_path / "onnx")
    exported = llmtune_onnx.load(tmp_path / "onnx")
    np.testing.assert_allclose(exported.outputs(TEXTS), reference(model, TEXTS), atol=1e-4)


def test_a_calibrated_model_exports_its_temperature_and_thresholds(tokenizer, tmp_path):
    binary = ClassifierModel(
        tiny_backbone("bert", len(tokenizer), tokenizer.pad_token_id),
        tokenizer,
        labels=["neg", "pos"],
        seed=1,
    )
    binary.temperature, binary.threshold = 2.5, 0.3  # as calibrate(threshold=...) leaves them
    binary.export_onnx(tmp_path / "binary")
    exported = llmtune_onnx.load(tmp_path / "binary")
    np.testing.assert_allclose(exported.outputs(TEXTS), reference(binary, TEXTS), atol=1e-4)
    assert exported.predict(TEXTS) == binary.predict(TEXTS, precision="fp32")

    multi = build(tokenizer, "bert", "multilabel")
    multi.temperature, multi.thresholds = 0.5, [0.2, 0.5, 0.8]
    multi.export_onnx(tmp_path / "multi")
    exported = llmtune_onnx.load(tmp_path / "multi")
    np.testing.assert_allclose(exported.outputs(TEXTS), reference(multi, TEXTS), atol=1e-4)
    assert exported.predict(TEXTS) == multi.predict(TEXTS, precision="fp32")
    assert exported.predict(TEXTS, threshold=0.5) == multi.predict(TEXTS, threshold=0.5, precision="fp32")


def test_a_windowed_model_is_refused(tokenizer, tmp_path):
    encoder = tiny_backbone("bert", len(tokenizer), tokenizer.pad_token_id)
    model = ClassifierModel(encoder, tokenizer, labels=["a", "b"], max_length=16, stride=4)
    with pytest.raises(ConfigError, match="windows"):
        model.export_onnx(tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_a_missing_or_damaged_file_is_named(tokenizer, tmp_path):
    import shutil

    build(tokenizer, "bert", "classification").export_onnx(tmp_path / "onnx")
    with pytest.raises(FileNotFoundError, match=r"model\.int8\.onnx is missing; llmtune\.onnx\.quantize"):
        llmtune_onnx.load(tmp_path / "onnx", quantized=True)
    for name, damage, error in [
        ("tokenizer.json", None, FileNotFoundError),
        ("tokenizer.json", '{"ver', ValueError),
        ("llmtune_onnx.json", '{"task": ', ValueError),
    ]:
        shutil.copytree(tmp_path / "onnx", tmp_path / "bad", dirs_exist_ok=True)
        if damage is None:
            (tmp_path / "bad" / name).unlink()
        else:
            (tmp_path / "bad" / name).write_text(damage)
        with pytest.raises(error, match=name.replace(".", r"\.")):
            llmtune_onnx.load(tmp_path / "bad")
        shutil.rmtree(tmp_path / "bad")


@pytest.mark.parametrize("side", ["right", "left"])
def test_pairs_of_long_texts_are_cut_before_truncation_to_the_same_tokens(tokenizer, tmp_path, side):
    # tokenizers truncates a pair in time and memory that grow with the square of its length
    # (two 20k-character texts: 15 s and 3 GB); cut first, as llmtune does, it reads the same.
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.truncation_side = side
    model = build(tok, "bert", "classification")
    model.export_onnx(tmp_path / "onnx")
    exported = llmtune_onnx.load(tmp_path / "onnx")
    first = ["good film " * 300 + "superb", "short", "awful " * 80]
    second = ["bad plot " * 300 + "dull", "the plot " * 90, "fine " * 60]
    cut = exported._clip_pairs(first, second)
    assert max(len(t) for t in cut[0] + cut[1]) < 1000  # the long sides were cut
    uncut = exported.tokenizer.encode_batch(list(zip(first, second)))
    assert [e.ids for e in exported.tokenizer.encode_batch(list(zip(*cut)))] == [e.ids for e in uncut]
    np.testing.assert_allclose(exported.outputs(first, second), reference(model, first, second), atol=1e-4)


def test_export_refuses_to_replace_an_earlier_export_holding_other_files(tokenizer, tmp_path):
    model = build(tokenizer, "bert", "classification")
    model.export_onnx(tmp_path / "onnx")
    quantize(tmp_path / "onnx")  # the export's own: replaced with it
    (tmp_path / "onnx" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an ONNX export"):
        model.export_onnx(tmp_path / "onnx")
    assert (tmp_path / "onnx" / "notes.txt").read_text() == "keep me"
    (tmp_path / "onnx" / "notes.txt").unlink()
    model.export_onnx(tmp_path / "onnx")  # an export over an export (and its int8 copy) goes on
    assert llmtune_onnx.load(tmp_path / "onnx").predict(["good"])


def test_split_special_tokens_reads_as_in_torch(tokenizer, tmp_path):
    import copy

    split = copy.deepcopy(tokenizer)
    split.split_special_tokens = True  # "[SEP]" in a text is five characters, not the separator
    model = build(split, "bert", "classification")
    model.export_onnx(tmp_path / "onnx")
    exported = llmtune_onnx.load(tmp_path / "onnx")
    texts = ["good [SEP] film [CLS] bad", "[PAD][SEP]"]
    np.testing.assert_allclose(exported.outputs(texts), reference(model, texts), atol=1e-4)
    assert exported.tokenizer.encode(texts[0]).ids == split(texts[0])["input_ids"]
