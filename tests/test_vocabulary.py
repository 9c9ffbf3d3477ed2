"""Growing the vocabulary by the text the tokenizer reads as unknown (`extend_vocabulary`)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import task_data
from families import FAMILIES, tiny_backbone

import llmtune._vocabulary as _vocabulary
from llmtune import ClassifierModel, ConfigError, DatasetAdapter, FineTuner, HeadOnly, OptimizerFactory
from llmtune._vocabulary import context_coordinates, unknown_spans

# The label is carried by characters the test tokenizer reads as [UNK] only: without new
# tokens "好" and "差" are the same token, and nothing can be learned.
GOOD, BAD = ["很好", "好极了", "真好"], ["很差", "差极了", "真差"]


def unreadable_task(n: int = 48) -> DatasetAdapter:
    texts = [f"the film {(GOOD if i % 2 == 0 else BAD)[i % 3]}" for i in range(n)]
    return DatasetAdapter.from_lists(texts, ["pos", "neg"] * (n // 2), source="reviews")


def embedding_of(model: ClassifierModel) -> torch.Tensor:
    return model.encoder.get_input_embeddings().weight


def test_unknown_spans_are_the_unread_characters_seen_often_enough(tokenizer):
    texts = ["好 good 好", "差 bad", "好 film 差", "乐"]
    assert unknown_spans(tokenizer, texts, min_count=2) == ["好", "差"]  # 3 and 2 times; 乐 once
    assert unknown_spans(tokenizer, texts, min_count=1) == ["好", "差", "乐"]
    assert unknown_spans(tokenizer, ["good film", "bad plot"]) == []
    # Adjacent unknown characters seen 5 times or more are a token too (a Chinese word).
    assert unknown_spans(tokenizer, ["很好看"] * 5 + ["真 好"]) == ["好", "很", "看", "好看", "很好"]
    assert "很好" not in unknown_spans(tokenizer, ["很好看"] * 4)


def test_a_vocabulary_without_an_unknown_token_has_nothing_to_add(tokenizer):
    byte_level = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    byte_level.unk_token = None
    assert unknown_spans(byte_level, ["好好"] * 3) == []


def test_a_slow_tokenizer_is_refused_by_name(make_model):
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast tokenizer"):
        unknown_spans(Slow(), ["好"])


def test_new_tokens_that_share_contexts_start_near_each_other(tokenizer):
    # Twelve new characters: six only ever between positive words, six between negative ones.
    warm, cold = list("甲乙丙丁戊己"), list("子丑寅卯辰巳")
    grown = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    grown.add_tokens([*warm, *cold, "午"])
    texts = [f"{a} {c} {b} film" for a, b in [("good", "great"), ("lovely", "fine")] for c in warm]
    texts += [f"{a} {c} {b} plot" for a, b in [("bad", "awful"), ("dull", "weak")] for c in cold]
    ids = grown.convert_tokens_to_ids([*warm, *cold, "午"])  # 午 is not in the text: drawn at random
    rng = torch.random.get_rng_state()
    place = context_coordinates(grown, texts, ids, dim=8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # svd_lowrank's draws do not leak
    assert torch.equal(place, context_coordinates(grown, texts, ids, dim=8, seed=3))
    assert place.shape == (13, 8) and torch.isfinite(place).all()
    cosine = torch.nn.functional.cosine_similarity(place[:12, None], place[None, :12], dim=-1)
    same = torch.block_diag(torch.ones(6, 6), torch.ones(6, 6)).bool() & ~torch.eye(12, dtype=torch.bool)
    across = ~torch.block_diag(torch.ones(6, 6), torch.ones(6, 6)).bool()
    assert cosine[same].mean() > 0.5 > cosine[across].mean()
    # Random draws (the first version) would not tell the two groups apart.
    drawn = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    random_cosine = torch.nn.functional.cosine_similarity(drawn[:, None], drawn[None], dim=-1)
    assert abs(random_cosine[same].mean() - random_cosine[across].mean()) < 0.3


def test_new_rows_start_by_their_contexts_on_small_training_sets_only(make_model, monkeypatch):
    data = unreadable_task()
    texts = list(data.dataset["text"])

    def grow(limit: int) -> tuple[ClassifierModel, torch.Tensor, list[int]]:
        monkeypatch.setattr(_vocabulary, "CONTEXT_MAX_TEXTS", limit)
        model = make_model(seed=5)
        old = embedding_of(model).detach().clone()
        added = model.extend_vocabulary(data)  # a new tokenizer: ask it for the ids after
        return model, old, model.tokenizer.convert_tokens_to_ids(added)

    model, old, ids = grow(len(texts))
    placed = context_coordinates(model.tokenizer, texts, ids, old.shape[1], seed=5)
    assert torch.allclose(embedding_of(model)[ids], old.mean(0) + placed * old.std(0))
    model, old, ids = grow(len(texts) - 1)  # past the limit the data places them: random draws
    drawn = torch.randn(len(ids), old.shape[1], generator=torch.Generator().manual_seed(5))
    assert torch.allclose(embedding_of(model)[ids], old.mean(0) + drawn * old.std(0))
    assert not torch.allclose(placed, drawn)


@pytest.mark.parametrize("limit", [48, 47])  # rows placed by their contexts, and drawn
def test_a_model_off_the_cpu_grows_its_vocabulary(make_model, monkeypatch, limit):
    # FineTuner.fit grows the vocabulary after moving the model to its device. The new rows'
    # coordinates are drawn on the CPU, and mixing them with a CUDA embedding's mean and
    # spread raised "Expected all tensors to be on the same device". The meta device stands
    # in for CUDA: it refuses CPU operands the same way.
    monkeypatch.setattr(_vocabulary, "CONTEXT_MAX_TEXTS", limit)
    model = make_model().to("meta")
    added = model.extend_vocabulary(unreadable_task())
    assert added
    assert embedding_of(model).device.type == "meta"
    assert embedding_of(model).shape[0] == len(model.tokenizer)


def test_counting_text_longer_than_the_model_reads_warns_of_nothing(tokenizer, caplog):
    # The ids are counted, never fed to the model: no "indexing errors" warning from transformers.
    short = copy.deepcopy(tokenizer)
    short.model_max_length, short.deprecation_warnings = 4, {}
    texts = ["好 good film 差 bad plot 好 差"] * 3
    library = logging.getLogger("transformers")
    library.addHandler(caplog.handler)
    try:
        assert unknown_spans(short, texts) == ["好", "差"]
        context_coordinates(short, texts, short.convert_tokens_to_ids(["good", "bad"]), dim=2, seed=0)
    finally:
        library.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "maximum sequence length" in r.getMessage()]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_grows_its_embedding_and_reads_the_new_tokens(family, tokenizer):
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["neg", "pos"])
    before = embedding_of(model).detach().clone()
    added = model.extend_vocabulary(unreadable_task())
    assert added[:6] == ["好", "差", "了", "很", "极", "真"]  # characters by count, then the pairs
    assert sorted(added[6:]) == sorted(["很好", "好极", "极了", "真好", "很差", "差极", "真差"])
    grown = embedding_of(model)
    assert grown.shape == (before.shape[0] + 13, before.shape[1])
    assert torch.equal(grown[: before.shape[0]], before)
    new = grown[before.shape[0] :]
    assert torch.cdist(new, new).add(torch.eye(13)).min() > 0  # distinct rows: the probe tells them apart
    assert model.tokenizer is not tokenizer and len(tokenizer) == before.shape[0]  # a copy grew
    ids = model.tokenizer("很好 很差", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and max(ids) >= before.shape[0]
    logits = model.logits(["the film 很好", "the film 很差"], precision="fp32")
    assert not np.allclose(logits[0], logits[1])  # before, both were [UNK] [UNK]


@pytest.mark.parametrize("fast_cpu", [True, False])
def test_training_moves_the_new_rows_only_and_learns_what_only_they_carry(make_model, fast_cpu):
    data = unreadable_task()
    options = dict(epochs=15, batch_size=8, probe=True, progress=False)
    kept = FineTuner(make_model(), extend_vocabulary=False, **options)
    kept.fit(data)
    assert kept.evaluate(data)["accuracy"] == pytest.approx(0.5)  # "好" and "差" both [UNK]

    model = make_model()
    before = embedding_of(model).detach().clone()
    rows = before.shape[0]
    tuner = FineTuner(model, fast_cpu=fast_cpu, **options)
    tuner.fit(data)
    after = embedding_of(model).detach()
    assert torch.equal(after[:rows], before)  # the pretrained rows are held by the mask
    drawn = embedding_of(_grown_copy(make_model, data)).detach()[rows:]
    assert not torch.allclose(after[rows:], drawn)  # the new ones trained
    assert tuner.evaluate(data)["accuracy"] > 0.75  # 1.0 with the fast paths, 0.83 without
    groups = {tuple(g["param_names"]): g for g in tuner.state.optimizer.param_groups}
    (group,) = [g for names, g in groups.items() if "encoder.embeddings.word_embeddings.weight" in names]
    assert group["initial_lr"] == 1e-3 and group["weight_decay"] == 0.0  # the head's LR, no decay


def _grown_copy(make_model, data: DatasetAdapter) -> ClassifierModel:
    """The same model with the same vocabulary grown, untrained: the rows as drawn."""
    model = make_model()
    model.extend_vocabulary(data)
    return model


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_the_other_tasks_grow_the_vocabulary_and_train_only_the_new_rows(make_model, task):
    base = task_data(task, n=32)
    texts = [f"{t} {'好极了' if i % 2 else '差极了'}" for i, t in enumerate(base.dataset["text"])]
    if task == "multilabel":  # the rows' names back from their 0/1 vectors
        labels = [[base.labels[j] for j, on in enumerate(row) if on] for row in base.dataset["label"]]
    else:
        labels = list(base.dataset["label"])
    data = DatasetAdapter.from_lists(texts, labels, task=task)
    model = make_model(labels=base.labels or (), task=task)
    before = embedding_of(model).detach().clone()
    FineTuner(model, max_steps=4, batch_size=8, progress=False).fit(data)
    after = embedding_of(model).detach()
    assert after.shape[0] > before.shape[0]
    assert torch.equal(after[: before.shape[0]], before)


def test_fit_grows_the_vocabulary_of_unreadable_text_and_says_so(make_model, caplog):
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        FineTuner(make_model(), max_steps=1, progress=False).fit(unreadable_task())
    assert "of the tokens of reviews are the unknown token '[UNK]': added 13 tokens" in caplog.text
    assert "extend_vocabulary=False" in caplog.text
    assert "multilingual" not in caplog.text  # after the new tokens the text is readable


def test_what_stays_unknown_after_growing_is_still_named(make_model, caplog):
    rare = [f"好 film {chr(0x4E00 + i)}" for i in range(16)]  # 好 16 times, the others once
    data = DatasetAdapter.from_lists(rare, ["pos", "neg"] * 8, source="rare")
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        FineTuner(make_model(), max_steps=1, progress=False).fit(data)
    assert "added 1 tokens" in caplog.text
    assert (
        "of the tokens of rare are the unknown token '[UNK]' of tokenizer '' after the new tokens"
        in caplog.text
    )
    assert "seen once" in caplog.text


def test_fit_leaves_the_vocabulary_of_readable_text_and_of_frozen_encoders(make_model, tokenizer):
    readable = DatasetAdapter.from_lists(["good movie", "bad movie"] * 8, ["pos", "neg"] * 8)
    model = make_model()
    FineTuner(model, max_steps=1, progress=False).fit(readable)
    assert embedding_of(model).shape[0] == len(tokenizer)
    frozen = make_model().tune(HeadOnly())  # features are cached: new rows could not train
    FineTuner(frozen, max_steps=1, progress=False).fit(unreadable_task())
    assert embedding_of(frozen).shape[0] == len(tokenizer)
    with pytest.raises(ConfigError, match=r"after tune\(HeadOnly\(...\)\)"):
        frozen.extend_vocabulary(unreadable_task())
    # Frozen by hand, as docs/peft.md allows: growing would make the embedding train.
    by_hand = make_model()
    for p in by_hand.encoder.parameters():
        p.requires_grad_(False)
    FineTuner(by_hand, max_steps=1, progress=False).fit(unreadable_task())
    assert embedding_of(by_hand).shape[0] == len(tokenizer)
    assert not any(p.requires_grad for p in by_hand.encoder.parameters())
    with pytest.raises(ConfigError, match="after freezing the encoder"):
        by_hand.extend_vocabulary(unreadable_task())


def test_a_grown_model_saves_and_loads_to_the_same_logits(make_model, tmp_path):
    model = _grown_copy(make_model, unreadable_task())
    FineTuner(model, max_steps=3, progress=False, optimizer=OptimizerFactory.adamw()).fit(unreadable_task())
    model.save_pretrained(tmp_path / "m")
    loaded = ClassifierModel.from_pretrained(tmp_path / "m")
    texts = ["the film 很好", "真差"]
    np.testing.assert_array_equal(
        loaded.logits(texts, precision="fp32"), model.logits(texts, precision="fp32")
    )


def test_a_grown_run_resumes_from_its_checkpoint_to_the_same_weights(make_model, tmp_path, caplog):
    from test_checkpoint import assert_same_weights, make_tuner, weights

    train = unreadable_task(32)  # batch 8: checkpoints at steps 3, 4, 6, 8
    model = make_model()
    make_tuner(model, tmp_path / "a").fit(train)
    expected = weights(model)
    fresh = make_model()  # the pretrained vocabulary: fit grows it the same way before resuming
    with caplog.at_level(logging.WARNING, logger="llmtune"):
        make_tuner(fresh, tmp_path / "b").fit(train, resume_from=tmp_path / "a" / "step-00000003")
    assert "tokenizer.vocab" not in caplog.text  # the same grown vocabulary as the checkpoint's
    assert_same_weights(weights(fresh), expected)


def test_a_padded_large_vocabulary_takes_the_new_ids_in_its_spare_rows(tokenizer):
    # Qwen2-style: more embedding rows than tokens, and 100,000 or more of them (frozen by default).
    from llmtune.model import LARGE_VOCABULARY

    model = ClassifierModel(tiny_backbone("bert", LARGE_VOCABULARY), tokenizer, labels=["neg", "pos"])
    assert not embedding_of(model).requires_grad
    before = embedding_of(model).detach().clone()
    added = model.extend_vocabulary(unreadable_task())
    ids = model.tokenizer.convert_tokens_to_ids(added)
    assert ids == list(range(len(tokenizer), len(tokenizer) + 13))
    weight = embedding_of(model)
    assert weight.shape == before.shape and weight.requires_grad  # no resize; the rows train now
    assert not torch.equal(weight[ids], before[ids])
    weight.sum().backward()
    assert weight.grad[ids].abs().min() > 0
    assert weight.grad.abs().sum() == weight.grad[ids].abs().sum()  # nothing else moves
