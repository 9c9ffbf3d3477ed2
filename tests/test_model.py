"""ClassifierModel: pooling, prediction, save/load round trips, loading by directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmtune import ClassifierModel, ConfigError

TEXTS = ["the film was good", "bad", "the plot was dull and the acting weak", "fine"]


def test_forward_shapes_and_mean_pooling_ignores_padding(make_model, tokenizer):
    model = make_model(labels=["a", "b", "c"], pooling="mean", dropout=0.0).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    logits = model(**enc)
    assert logits.shape == (4, 3)
    alone = model(**tokenizer(TEXTS[1:2], return_tensors="pt"))
    torch.testing.assert_close(logits[1:2], alone, atol=1e-5, rtol=1e-5)
    hidden = model.encoder(**enc).last_hidden_state
    n = enc["attention_mask"][1].sum()
    torch.testing.assert_close(model.encode(**enc)[1], hidden[1, :n].mean(0))


def test_cls_pooling_takes_the_first_token(make_model, tokenizer):
    model = make_model(pooling="cls").eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    torch.testing.assert_close(model.encode(**enc), model.encoder(**enc).last_hidden_state[:, 0])


def test_predict_and_predict_proba(make_model):
    model = make_model(labels=["neg", "pos"])
    probs = model.predict_proba(TEXTS)
    assert probs.shape == (4, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert model.predict(TEXTS) == [["neg", "pos"][i] for i in probs.argmax(1)]
    one_by_one = np.concatenate([model.predict_proba([t]) for t in TEXTS])
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)
    assert model.training  # predict restores the mode it found
    with pytest.raises(TypeError, match="list of texts"):
        model.predict("one string")


def test_save_load_round_trip_gives_identical_logits(make_model, tmp_path):
    model = make_model(labels=["neg", "neu", "pos"], pooling="mean", max_length=32)
    with torch.no_grad():
        model.head.weight.normal_()  # a trained-looking head, not the init
    model.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "llmtune_head.safetensors"} <= files
    loaded = ClassifierModel.from_pretrained(tmp_path / "out")
    assert (loaded.labels, loaded.pooling, loaded.max_length, loaded.task) == (
        ["neg", "neu", "pos"],
        "mean",
        32,
        "classification",
    )
    np.testing.assert_array_equal(loaded.logits(TEXTS), model.logits(TEXTS))
    assert loaded.predict(TEXTS) == model.predict(TEXTS)
    with pytest.raises(ConfigError, match="trained with labels"):
        ClassifierModel.from_pretrained(tmp_path / "out", labels=["x", "y", "z"])


def test_from_pretrained_directory_and_pooling_auto(model_dir):
    model = ClassifierModel.from_pretrained(model_dir, labels=["a", "b"])
    assert model.pooling == "cls" and model.labels == ["a", "b"] and model.head.out_features == 2
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert ClassifierModel.from_pretrained(model_dir, num_labels=3).pooling == "mean"
    pooling = model_dir / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({"pooling_mode_lasttoken": True}))
    assert ClassifierModel.from_pretrained(model_dir, num_labels=3).pooling == "last"
    pooling.write_text(json.dumps({"pooling_mode_max_tokens": True}))  # was read as CLS, silently
    with pytest.raises(ConfigError, match=r"trained with pooling \['pooling_mode_max_tokens'\]"):
        ClassifierModel.from_pretrained(model_dir, num_labels=3)
    assert ClassifierModel.from_pretrained(model_dir, num_labels=3, pooling="mean").pooling == "mean"
    pooling.write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    reg = ClassifierModel.from_pretrained(model_dir)
    assert reg.task == "regression" and reg.head.out_features == 1
    assert isinstance(reg.predict(["x", "y"])[0], float)


def test_label_count_must_agree(make_model, tokenizer):
    from conftest import tiny_encoder

    with pytest.raises(ConfigError, match="num_labels=3 but 2 labels"):
        ClassifierModel(tiny_encoder(tokenizer), tokenizer, labels=["a", "b"], num_labels=3)
    with pytest.raises(ConfigError, match="needs labels"):
        ClassifierModel(tiny_encoder(tokenizer), tokenizer)
    with pytest.raises(ConfigError, match="pooling"):
        make_model(pooling="max")


def test_multilabel_predict(make_model):
    model = make_model(labels=["x", "y", "z"], task="multilabel")
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([5.0, -5.0, 5.0]))
        model.head.weight.zero_()
    assert model.predict(["a", "b"]) == [["x", "z"], ["x", "z"]]


def test_a_large_vocabulary_is_frozen_by_default_and_full_trains_it(tokenizer):
    from transformers import BertConfig, BertModel

    from llmtune import ClassifierModel, Full

    config = BertConfig(vocab_size=120_000, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    model = ClassifierModel(BertModel(config, add_pooling_layer=False), tokenizer, labels=["a", "b"])
    embedding = model.encoder.get_input_embeddings().weight
    assert not embedding.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)
    model.tune(Full())
    assert embedding.requires_grad
