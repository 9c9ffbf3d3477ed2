"""Shared fixtures: a WordPiece tokenizer trained on the spot and tiny random-weight BERTs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from llmtune import ClassifierModel, DatasetAdapter

POSITIVE = ["good", "great", "superb", "lovely", "fine"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "film", "plot", "was", "a", "story", "acting", "very", "and", "it", "music", "cast"]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def sentiment_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A learnable task: the label is given by which sentiment word the text holds."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(2, 12))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def task_data(task: str, n: int = 48) -> DatasetAdapter:
    """`sentiment_texts` as a classification, multi-label or regression data set."""
    texts, names = sentiment_texts(n)
    if task == "multilabel":
        labels = [[name] + (["long"] if len(t.split()) > 7 else []) for t, name in zip(texts, names)]
    elif task == "regression":
        labels = [float(name == "pos") + 0.1 * len(t.split()) for t, name in zip(texts, names)]
    else:
        labels = names
    return DatasetAdapter.from_lists(texts, labels, task=task)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer: no special tokens around a text, so "" is no tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(sentiment_texts(200)[0], trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=end,
        bos_token=end,
        unk_token=end,
        pad_token=end,
        model_max_length=1024,
    )


def build_tokenizer():
    """A WordPiece tokenizer over the sentiment words, with [CLS] ... [SEP] around each text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [" ".join(POSITIVE + NEGATIVE + FILLER)] * 5 + sentiment_texts(200)[0]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def tiny_encoder(tokenizer, dropout: float = 0.1, layers: int = 2):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config, add_pooling_layer=False)


@pytest.fixture
def make_model(tokenizer):
    """Build a tiny ClassifierModel: make_model(labels=[...]) or make_model(task="regression")."""

    def make(labels=("neg", "pos"), task="classification", dropout=0.1, **kwargs) -> ClassifierModel:
        labels = None if task == "regression" else list(labels)
        return ClassifierModel(
            tiny_encoder(tokenizer, dropout), tokenizer, labels=labels, task=task, dropout=dropout, **kwargs
        )

    return make


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A local directory holding a tiny pretrained encoder and its tokenizer (no head)."""
    path = tmp_path / "tiny-bert"
    tiny_encoder(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
