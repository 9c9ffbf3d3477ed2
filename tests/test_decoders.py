"""Decoder LLMs as classifiers: last-token pooling under either padding, LoRA, checkpointing, dtype."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import sentiment_texts
from families import DECODERS, FAMILIES, tiny_backbone

from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, LoRA, OptimizerFactory

TEXTS = ["good", "the film was a very dull story and the acting was weak", "fine plot"]


def save_backbone(family, tokenizer, path):
    tiny_backbone(family, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", DECODERS)
def test_a_decoder_pools_its_last_token(family, tokenizer, tmp_path):
    model = ClassifierModel.from_pretrained(
        save_backbone(family, tokenizer, tmp_path / family), labels=["a", "b"]
    )
    assert model.pooling == "last" and model.decoder
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model.eval().encode(ids, mask), hidden[:, 3])


# Tokenizers pad on either side (an encoder's is set to pad on the right), with every pooling.
SIDES = [
    (f, side, pooling) for f in FAMILIES for side in ("right", "left") for pooling in ("cls", "mean", "last")
]


@pytest.mark.parametrize(("family", "side", "pooling"), SIDES)
def test_a_row_gives_the_same_logits_alone_and_in_a_padded_batch(
    family, side, pooling, tokenizer, monkeypatch
):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    model = ClassifierModel(
        tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b"], dropout=0.0, pooling=pooling
    )
    batch = model.logits(TEXTS, precision="fp32")
    alone = np.concatenate([model.logits([text], precision="fp32") for text in TEXTS])
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    # As on CUDA: each row alone in its batch, padded up to a multiple of 8 (3 tokens to 8).
    monkeypatch.setattr("llmtune._runtime.pad_multiple", lambda device: 8)
    padded = model.logits(TEXTS, batch_size=1, precision="fp32")
    np.testing.assert_allclose(padded, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_an_empty_text_reads_as_end_of_text_where_the_tokenizer_adds_nothing(family, bpe_tokenizer):
    # A byte-level BPE tokenizer reads "" as no tokens: nothing to pool, alone or in a batch.
    assert bpe_tokenizer("")["input_ids"] == []
    model = ClassifierModel(
        tiny_backbone(family, len(bpe_tokenizer)), bpe_tokenizer, labels=["a", "b"], dropout=0.0
    )
    alone = model.logits([""], precision="fp32")
    np.testing.assert_allclose(model.logits(["", TEXTS[1]], precision="fp32")[:1], alone, atol=1e-5)
    end = model.logits(["<|endoftext|>"], precision="fp32")
    np.testing.assert_allclose(alone, end, atol=1e-6)
    data = DatasetAdapter.from_lists(["", "", "good", "awful"], ["a", "a", "b", "b"])
    tuner = FineTuner(model, epochs=1, batch_size=2, progress=False, group_by_length=True, precision="fp32")
    tuner.fit(data, data)
    assert np.isfinite(tuner.evaluate(data)["loss"])


@pytest.mark.parametrize("stride", [None, 2])
def test_text_pairs_are_refused_where_the_tokenizer_puts_nothing_between_them(
    stride, bpe_tokenizer, tokenizer
):
    # ("the film", " was good") and ("the", " film was good") would be the same tokens
    model = ClassifierModel(
        tiny_backbone("gpt2", len(bpe_tokenizer)),
        bpe_tokenizer,
        labels=["a", "b"],
        max_length=8,
        stride=stride,
    )
    with pytest.raises(ConfigError, match="no token between the two texts of a pair"):
        model.logits(["the film", "the"], text_pairs=[" was good", " film was good"])
    data = DatasetAdapter.from_lists(
        ["the film", "the"], ["a", "b"], text_pairs=[" was good", " film was good"]
    )
    with pytest.raises(ConfigError, match="no token between the two texts of a pair"):
        FineTuner(model, epochs=1, progress=False).fit(data)
    # a tokenizer with a separator ([SEP]) reads pairs on a decoder as on an encoder
    model = ClassifierModel(
        tiny_backbone("llama", len(tokenizer)), tokenizer, labels=["a", "b"], stride=stride
    )
    assert model.logits(["the film"], text_pairs=[" was good"]).shape == (1, 2)


def test_a_tokenizer_without_pad_pads_with_eos_and_says_so(tokenizer, caplog):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="[SEP]")
    with caplog.at_level(logging.INFO, logger="llmtune"):
        model = ClassifierModel(tiny_backbone("llama", len(bare)), bare, labels=["a", "b"])
    assert "no pad token: padding with '[SEP]'" in caplog.text
    assert len(model.predict(TEXTS)) == 3


def test_a_pad_token_without_an_embedding_row_is_refused(bpe_tokenizer, tmp_path):
    # A pad token added to a decoder's tokenizer without resizing: torch's IndexError at predict
    tok = copy.deepcopy(bpe_tokenizer)
    tok.pad_token = None
    tok.add_special_tokens({"pad_token": "<pad>"})
    encoder = tiny_backbone("llama", len(tok) - 1)
    with pytest.raises(ConfigError, match="'<pad>' is id 300, but the encoder's embedding has 300 rows"):
        ClassifierModel(encoder, tok, labels=["a", "b"])
    encoder.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="resize it"):
        ClassifierModel.from_pretrained(tmp_path, labels=["a", "b"])
    encoder.resize_token_embeddings(len(tok))
    assert len(ClassifierModel(encoder, tok, labels=["a", "b"]).predict(["good", "a very dull film"])) == 2


@pytest.mark.parametrize(
    ("family", "targets"),
    [("llama", {"q_proj", "v_proj"}), ("qwen2", {"q_proj", "v_proj"}), ("gemma", {"q_proj", "v_proj"}),
     ("gpt2", {"c_attn"}), ("bert", {"query", "value"}), ("distilbert", {"q_lin", "v_lin"}),
     ("deberta-v2", {"query_proj", "value_proj"}), ("modernbert", {"Wqkv"})],
)  # fmt: skip
def test_lora_adapts_each_familys_attention_projections(family, targets, tokenizer):
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b"]).tune(
        LoRA(r=2)
    )
    # names end in "<target>.lora_A.default.weight"
    adapted = {name.split(".")[-4] for name, _ in model.encoder.named_parameters() if "lora_A" in name}
    assert adapted == targets
    assert all(p.requires_grad for p in model.head.parameters())


def test_lora_without_default_targets_names_the_linear_layers(tokenizer):
    model = ClassifierModel(tiny_backbone("bert", len(tokenizer)), tokenizer, labels=["a", "b"])
    model.encoder.config.model_type = "unknown-family"
    with pytest.raises(ConfigError, match="no default targets for unknown-family.*'query'"):
        model.tune(LoRA())


def _perturb(model):
    with torch.no_grad():  # B starts at zero: give the adapters something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("family", DECODERS)
def test_lora_adapter_and_merged_directories_predict_alike(family, tokenizer, tmp_path):
    base = save_backbone(family, tokenizer, tmp_path / "base")
    model = ClassifierModel.from_pretrained(base, labels=["a", "b", "c"]).tune(LoRA(r=2))
    _perturb(model)
    expected = model.logits(TEXTS, precision="fp32")
    model.save_pretrained(tmp_path / "adapter")
    adapter = ClassifierModel.from_pretrained(tmp_path / "adapter")
    np.testing.assert_allclose(adapter.logits(TEXTS, precision="fp32"), expected, rtol=0, atol=1e-5)
    model.merge().save_pretrained(tmp_path / "merged")
    merged = ClassifierModel.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(merged.logits(TEXTS, precision="fp32"), expected, rtol=0, atol=1e-5)


def _gradients(family, tokenizer, tune, checkpointing):
    torch.manual_seed(0)
    backbone = tiny_backbone(family, len(tokenizer))
    model = ClassifierModel(
        backbone, tokenizer, labels=["a", "b"], dropout=0.0, gradient_checkpointing=checkpointing
    )
    if tune:
        model.tune(LoRA(r=2, dropout=0.0))
        _perturb(model)
    model.train()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch.pop("token_type_ids", None)
    torch.nn.functional.cross_entropy(model(**batch), torch.tensor([0, 1, 1])).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tune", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(family, tune, tokenizer):
    plain = _gradients(family, tokenizer, tune, checkpointing=False)
    checkpointed = _gradients(family, tokenizer, tune, checkpointing=True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 2
    if tune:
        assert any("lora_A" in n for n in plain)  # gradients reach the adapters in frozen layers
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_weights_train_with_an_fp32_head(tokenizer, tmp_path):
    base = save_backbone("llama", tokenizer, tmp_path / "base")
    model = ClassifierModel.from_pretrained(base, labels=["neg", "pos"], dtype=torch.bfloat16)
    assert model.encoder.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.float32
    texts, labels = sentiment_texts(16)
    FineTuner(model, epochs=1, batch_size=8, progress=False).fit(DatasetAdapter.from_lists(texts, labels))
    assert np.isfinite(model.logits(TEXTS)).all()


def test_quantized_loading_says_what_to_install(tokenizer, tmp_path):
    base = save_backbone("llama", tokenizer, tmp_path / "base")
    pytest.importorskip("torch")
    with pytest.raises(ConfigError, match="pip install bitsandbytes|CUDA GPU"):
        ClassifierModel.from_pretrained(base, labels=["a", "b"], quantization="4bit")
    with pytest.raises(ConfigError, match="'4bit', '8bit' or None"):
        ClassifierModel.from_pretrained(base, labels=["a", "b"], quantization="2bit")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_decoder_classifier_learns(family, tokenizer):
    texts, labels = sentiment_texts(240)
    train, val = DatasetAdapter.from_lists(texts, labels).split(validation=0.2, seed=0)
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=train.labels)
    tuner = FineTuner(
        model, optimizer=OptimizerFactory.adamw(lr=3e-3), epochs=10, batch_size=16, progress=False
    )
    tuner.fit(train, val)
    assert tuner.evaluate(val)["accuracy"] >= 0.9
