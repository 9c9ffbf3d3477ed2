"""Loading a model directory never hands back a wrong model without a word."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_encoder
from families import FAMILIES, tiny_backbone
from safetensors.torch import load_file, save_file

from llmtune import CheckpointError, ClassifierModel, ConfigError, DataError

TEXTS = ["good film", "awful plot and weak acting", "the story"]


@pytest.fixture
def saved(tmp_path, make_model):
    path = tmp_path / "model"
    make_model(labels=["neg", "pos"]).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_saves_and_loads_to_the_same_logits(family, tokenizer, tmp_path):
    model = ClassifierModel(tiny_backbone(family, len(tokenizer)), tokenizer, labels=["a", "b", "c"])
    model.save_pretrained(tmp_path / "m")
    loaded = ClassifierModel.from_pretrained(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.logits(TEXTS, precision="fp32"), model.logits(TEXTS, precision="fp32")
    )


def test_a_directory_without_tokenizer_files_is_refused(tmp_path, tokenizer):
    tiny_encoder(tokenizer).save_pretrained(tmp_path / "bare")
    with pytest.raises(ConfigError, match="has no tokenizer files.*every word would become \\[UNK\\]"):
        ClassifierModel.from_pretrained(tmp_path / "bare", labels=["a", "b"])


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    big = BertModel(BertConfig(vocab_size=5000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    big.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(
        ConfigError, match=f"tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary 5000"
    ):
        ClassifierModel.from_pretrained(tmp_path / "m", labels=["a", "b"])


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_encoder_weights_are_refused_by_name(model_dir):
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, model_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['encoder\.layer\.1\..*initialise the missing"):
        ClassifierModel.from_pretrained(model_dir, labels=["a", "b"])


def test_a_config_with_more_layers_than_the_weights_is_refused(model_dir):
    _edit_config(model_dir, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"\(bert, 3 layers\): missing \['encoder\.layer\.2\."):
        ClassifierModel.from_pretrained(model_dir, labels=["a", "b"])


def test_weights_the_config_has_no_place_for_are_refused_unless_asked_for(model_dir):
    _edit_config(model_dir, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"not in the model \['encoder\.layer\.1\."):
        ClassifierModel.from_pretrained(model_dir, labels=["a", "b"])
    with pytest.raises(CheckpointError, match="not in the model"):  # dtype= reshapes nothing
        ClassifierModel.from_pretrained(model_dir, labels=["a", "b"], dtype=torch.float32)
    _edit_config(model_dir, num_hidden_layers=2)
    # Asked for: the first layer of a two-layer encoder, as the examples' --quick runs do.
    model = ClassifierModel.from_pretrained(model_dir, labels=["a", "b"], num_hidden_layers=1)
    assert len(model.encoder_layers()) == 1


def test_other_heads_in_the_checkpoint_are_dropped_quietly(tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    model = ClassifierModel.from_pretrained(tmp_path / "mlm", labels=["a", "b"])
    assert model.predict(TEXTS)


@pytest.mark.parametrize("file", ["model.safetensors", "llmtune_head.safetensors", "llmtune_head.json"])
def test_a_damaged_file_is_named(saved, file):
    (saved / file).write_bytes((saved / file).read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot read .*the model directory is damaged"):
        ClassifierModel.from_pretrained(saved)


def test_nan_weights_are_refused(saved):
    head = load_file(saved / "llmtune_head.safetensors")
    head["weight"][0, 0] = float("nan")
    save_file(head, saved / "llmtune_head.safetensors")
    with pytest.raises(CheckpointError, match=r"weights \['head\.weight'\] hold NaN or inf"):
        ClassifierModel.from_pretrained(saved)


def test_head_format_is_read(saved):
    record = json.loads((saved / "llmtune_head.json").read_text())
    assert record["format"] == 1
    (saved / "llmtune_head.json").write_text(json.dumps({**record, "format": 2}))
    with pytest.raises(CheckpointError, match="newer llmtune .*upgrade"):
        ClassifierModel.from_pretrained(saved)
    # The first release wrote neither a format nor, at first, the pooling: CLS then.
    old = {k: v for k, v in record.items() if k not in ("format", "pooling")}
    (saved / "llmtune_head.json").write_text(json.dumps(old))
    assert ClassifierModel.from_pretrained(saved).pooling == "cls"


@pytest.mark.parametrize("path", ["./no-such-model", "runs/typo/model", "~/models/nothing", "/abs/path"])
def test_a_mistyped_local_path_fails_at_once(path):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="no such directory"):
        ClassifierModel.from_pretrained(path, labels=["a", "b"])
    assert time.perf_counter() - start < 5  # not the Hub's retries


def test_arguments_that_contradict_a_saved_model_are_refused(saved):
    for options in ({"labels": ["x", "y"]}, {"task": "multilabel"}, {"num_labels": 3}, {"pooling": "mean"}):
        with pytest.raises(ConfigError, match="was trained with labels .*contradict"):
            ClassifierModel.from_pretrained(saved, **options)
    assert ClassifierModel.from_pretrained(saved, labels=["neg", "pos"], task="classification").labels


@pytest.mark.parametrize("labels", [[], ["a", "a"]])
def test_empty_or_duplicate_labels_are_refused(make_model, labels):
    with pytest.raises(ConfigError, match="distinct names, at least one"):
        make_model(labels=labels)


def test_predict_on_no_texts_and_on_a_non_text(make_model):
    model = make_model()
    assert model.predict([]) == [] and model.predict_proba([]).shape == (0, 2)
    with pytest.raises(DataError, match=r"texts\[1\] is None \(NoneType\), not a string"):
        model.predict(["fine", None])


def test_a_real_type_error_in_loading_is_not_swallowed(model_dir, monkeypatch):
    # Before, any TypeError from the load was taken for "this encoder has no pooler flag"
    # and the load retried without it, hiding the mistake.
    from transformers import AutoModel

    real = AutoModel.from_pretrained

    def broken(*args, **kwargs):
        if "add_pooling_layer" in kwargs:
            raise TypeError("a real mistake")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", broken)
    with pytest.raises(TypeError, match="a real mistake"):
        ClassifierModel.from_pretrained(model_dir, labels=["a", "b"])


def test_max_length_is_capped_at_the_encoder_positions(tokenizer):
    tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="[PAD]")
    assert tokenizer.model_max_length > 10**6  # no limit of its own: 512 was assumed
    for family, positions in (("bert", 40), ("roberta", 39)):  # RoBERTa: pad id 0, offset 1
        model = ClassifierModel(
            tiny_backbone(family, len(tokenizer), max_positions=40), tokenizer, labels=["a", "b"]
        )
        assert model.max_length == positions
        assert model.predict([" ".join(["good"] * 500)])  # used to crash past the positions
        with pytest.raises(ConfigError, match=f"max_length=64 but the encoder has {positions} positions"):
            ClassifierModel(model.encoder, tokenizer, labels=["a", "b"], max_length=64)
    # DeBERTa-v3 has no absolute position table (relative positions only): no such limit.
    from families import tiny_config
    from transformers import AutoModel

    config = tiny_config("deberta-v2", len(tokenizer), max_positions=40)
    config.position_biased_input = False
    v3 = ClassifierModel(AutoModel.from_config(config), tokenizer, labels=["a", "b"], max_length=120)
    assert v3.max_length == 120 and v3.logits([" ".join(["good"] * 200)]).shape == (1, 2)


def test_a_tokenizer_without_pad_pads_with_eos_or_is_refused(tokenizer, make_model):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="[SEP]")
    assert bare.pad_token_id is None
    model = ClassifierModel(tiny_encoder(bare), bare, labels=["a", "b"])
    assert bare.pad_token == "[SEP]" and len(model.predict(TEXTS)) == 3
    none = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ConfigError, match="no pad token and no end-of-sequence token"):
        ClassifierModel(tiny_encoder(none), none, labels=["a", "b"])
    model = make_model()
    model.tokenizer.pad_token = None
    try:
        with pytest.raises(ConfigError, match="has no pad token; set one"):
            model.predict(TEXTS)  # the same message as training gives
    finally:
        model.tokenizer.pad_token = "[PAD]"


SEED_SCRIPT = """
import hashlib, sys
sys.path.insert(0, {tests!r})
from conftest import sentiment_texts
from llmtune import ClassifierModel, DatasetAdapter, FineTuner, LoRA
model = ClassifierModel.from_pretrained({path!r}, labels=["neg", "pos"])
if {lora!r}:
    model.tune(LoRA(r=2))
texts, labels = sentiment_texts(32)
if {unknown!r}:  # text the tokenizer cannot read: fit grows the vocabulary with drawn rows
    texts = [t + " 好极了" for t in texts]
FineTuner(model, epochs=1, batch_size=8, progress=False).fit(DatasetAdapter.from_lists(texts, labels))
digest = hashlib.sha256()
for name, value in sorted(model.state_dict().items()):
    digest.update(value.float().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.parametrize("lora, unknown", [(False, False), (True, False), (False, True)])
def test_the_same_seed_gives_the_same_model_in_two_fresh_processes(model_dir, lora, unknown):
    # torch seeds its default generator at random in every process; the head (and LoRA's
    # adapters) are drawn before FineTuner seeds anything, so they take their own seed.
    code = SEED_SCRIPT.format(
        tests=str(Path(__file__).parent), path=str(model_dir), lora=lora, unknown=unknown
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout


def test_seed_none_draws_from_torch(make_model):
    torch.manual_seed(1)
    a = make_model(seed=None).head.weight.clone()
    b = make_model(seed=None).head.weight
    assert not torch.equal(a, b)
    assert torch.equal(make_model(seed=3).head.weight, make_model(seed=3).head.weight)
