"""The model card save_pretrained writes, read back with huggingface_hub's own reader."""

from __future__ import annotations

import json

import pytest
from conftest import sentiment_texts
from huggingface_hub import ModelCard, metadata_load

from llmtune import ClassifierModel, DatasetAdapter, FineTuner, LoRA, OptimizerFactory


def fitted(model, epochs=3):
    texts, labels = sentiment_texts(80)
    train, val = DatasetAdapter.from_lists(texts, labels, source="sentiment words").split(0.25, seed=0)
    tuner = FineTuner(
        model, optimizer=OptimizerFactory.adamw(lr=1e-3), epochs=epochs, batch_size=8, progress=False
    )
    history = tuner.fit(train, val)
    return tuner, history, train, val


def test_a_trained_model_card_holds_its_setup_and_the_kept_epochs_metrics(make_model, tmp_path):
    tuner, history, train, val = fitted(make_model())
    target = tmp_path / "sentiment-model"
    tuner.model.save_pretrained(target)
    card = ModelCard.load(target / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "llmtune" and data["pipeline_tag"] == "text-classification"
    assert data["labels"] == ["neg", "pos"] and "llmtune" in data["tags"]
    assert sorted(data["metrics"]) == ["accuracy", "ece", "f1", "loss"]
    kept = next(c for c in tuner.callbacks if type(c).__name__ == "KeepBest").best_epoch
    record = history.records[kept]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["f1"].metric_value == pytest.approx(record["val_f1"])
    assert results["accuracy"].metric_value == pytest.approx(record["val_accuracy"])
    assert results["f1"].dataset_name == "sentiment words" and results["f1"].dataset_split == "validation"
    assert metadata_load(target / "README.md")["model-index"][0]["name"] == "sentiment-model"
    text = card.text
    assert f"| data.train_examples | {len(train)} |" in text and "| optimizer.lr | 0.001 |" in text
    assert f"epoch {kept + 1}, the weights saved" in text
    # The card is one of the model's files: saving again replaces it, loading ignores it.
    assert "README.md" in json.loads((target / "llmtune_head.json").read_text())["files"]
    tuner.model.save_pretrained(target)
    assert ClassifierModel.from_pretrained(target).labels == ["neg", "pos"]


def test_an_untrained_model_writes_a_minimal_card(make_model, tmp_path):
    make_model(task="regression").save_pretrained(tmp_path / "m")
    data = metadata_load(tmp_path / "m" / "README.md")
    assert data["library_name"] == "llmtune" and "regression" in data["tags"]
    assert "model-index" not in data and "labels" not in data
    assert "without a training record" in ModelCard.load(tmp_path / "m" / "README.md").text


def test_the_card_of_a_lora_model_replaces_peft_s(model_dir, tmp_path):
    pytest.importorskip("peft")
    model = ClassifierModel.from_pretrained(model_dir, labels=["neg", "pos"]).tune(LoRA(r=2))
    fitted(model, epochs=1)
    model.save_pretrained(tmp_path / "adapter")
    data = metadata_load(tmp_path / "adapter" / "README.md")
    assert data["library_name"] == "llmtune" and "lora" in data["tags"]
    assert "base_model" not in data  # a local directory is no Hub id; the text names it
    assert str(model_dir.resolve()) in ModelCard.load(tmp_path / "adapter" / "README.md").text


def test_the_card_says_how_a_calibrated_windowed_model_reads_and_decides(tokenizer, tmp_path):
    from families import tiny_backbone

    encoder = tiny_backbone("bert", len(tokenizer), tokenizer.pad_token_id)
    model = ClassifierModel(encoder, tokenizer, labels=["neg", "pos"], max_length=16, stride=4)
    fitted(model, epochs=1)
    model.temperature, model.threshold = 1.7, 0.35
    model.save_pretrained(tmp_path / "m")
    text = ModelCard.load(tmp_path / "m" / "README.md").text
    assert "| model.stride | 4 |" in text and "| model.aggregation | mean |" in text
    assert "softmax(logits / 1.7)" in text and "probability 0.35 or above" in text


def test_a_reloaded_model_keeps_its_record_and_the_card_says_what_was_done(make_model, tmp_path):
    tuner, history, _, val = fitted(make_model())
    tuner.model.save_pretrained(tmp_path / "first")
    first = ModelCard.load(tmp_path / "first" / "README.md").text
    # Loaded, calibrated and saved again: still the same training (it had said "not trained").
    reloaded = ClassifierModel.from_pretrained(tmp_path / "first")
    reloaded.calibrate(val)
    reloaded.save_pretrained(tmp_path / "again")
    again = ModelCard.load(tmp_path / "again" / "README.md").text
    assert "without a training record" not in again
    assert first.split("## Validation")[1].split("##")[0] == again.split("## Validation")[1].split("##")[0]
    assert "Probabilities are softmax(logits" in again
    texts, labels = sentiment_texts(40)
    multi = DatasetAdapter.from_lists(texts, [[y] for y in labels], task="multilabel")
    model = make_model(labels=multi.labels, task="multilabel")
    FineTuner(model, epochs=1, progress=False).fit(multi)  # and no validation data
    model.calibrate(multi)
    model.save_pretrained(tmp_path / "multi")
    text = ModelCard.load(tmp_path / "multi" / "README.md").text
    assert "no validation data" in text and "None" not in text.split("## Training")[1].split("\n")[2]
    assert "Probabilities are sigmoid(logits" in text  # as predict_proba computes them


def test_keep_best_keeps_the_kept_states_metrics_through_a_checkpoint(make_model):
    # A resumed run has no probe_metrics of its own: the card read the last epoch instead.
    from llmtune import KeepBest

    tuner, history, _, _ = fitted(make_model())
    keep = next(c for c in tuner.callbacks if isinstance(c, KeepBest))
    restored = KeepBest()
    restored.load_state_dict(keep.state_dict())
    assert restored.best_metrics == keep.best_metrics
    assert restored.best_metrics["f1"] == pytest.approx(history.records[keep.best_epoch]["val_f1"])
