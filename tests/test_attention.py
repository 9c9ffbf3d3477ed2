"""Tests for llmtune.attention against torch's kernel, transformers' kernels and a tiny BERT."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface, BertConfig, BertForSequenceClassification, BertModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.bert.modeling_bert import eager_attention_forward

from llmtune.attention import (
    MultiHeadAttention,
    llmtune_attention_forward,
    register,
    scaled_dot_product_attention,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
MASK_KINDS = ["none", "bool", "additive", "padding", "causal", "causal+bool"]


def make_case(seed: int, dtype: torch.dtype, mask_kind: str, lead=(2, 3), L=5, S=7, E=8, Ev=6):
    """Random q, k, v and a mask of the requested kind (plus the mask to give torch)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, L, E, generator=g, dtype=dtype)  # (..., L, E)
    k = torch.randn(*lead, S, E, generator=g, dtype=dtype)  # (..., S, E)
    v = torch.randn(*lead, S, Ev, generator=g, dtype=dtype)  # (..., S, Ev)
    keep = torch.rand(L, S, generator=g) > 0.3  # (L, S), broadcast over the leading dims
    keep[:, 0] = True  # every row keeps one key, so torch has no fully masked row either
    if mask_kind == "none" or mask_kind == "causal":
        return q, k, v, None
    if mask_kind in ("bool", "causal+bool"):
        return q, k, v, keep
    if mask_kind == "additive":  # -inf blocks, finite values bias the scores
        bias = torch.randn(L, S, generator=g, dtype=dtype)
        return q, k, v, bias.masked_fill(~keep, float("-inf"))
    lengths = torch.randint(1, S + 1, lead[:1], generator=g)  # padding: (B, 1.., 1, S)
    pad = torch.arange(S)[None, :] < lengths[:, None]  # (B, S)
    return q, k, v, pad.view(lead[0], *([1] * len(lead[1:])), 1, S)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_sdpa(dtype, mask_kind, scale, seed):
    q, k, v, mask = make_case(seed, dtype, mask_kind)
    is_causal = mask_kind.startswith("causal")
    ours = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    if mask_kind == "causal+bool":  # torch refuses both at once: combine them by hand
        mask, is_causal = mask & torch.ones(5, 7, dtype=torch.bool).tril(), False
    ref = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    assert ours.dtype == dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=TOL[dtype], rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    L=st.integers(1, 6),
    S=st.integers(1, 6),
    E=st.integers(1, 9),
    Ev=st.integers(1, 5),
    mask_kind=st.sampled_from(MASK_KINDS),
    scale=st.one_of(st.none(), st.floats(0.01, 3.0)),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_sdpa_property(lead, L, S, E, Ev, mask_kind, scale, seed):
    lead = tuple(lead) or (1,)
    q, k, v, mask = make_case(seed, torch.float64, mask_kind, lead, L, S, E, Ev)
    is_causal = mask_kind.startswith("causal") and L <= S  # no fully masked causal rows
    ours = scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    if mask_kind == "causal+bool" and is_causal:
        mask, is_causal = mask & torch.ones(L, S, dtype=torch.bool).tril(), False
    ref = F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


def test_weights_are_a_distribution_that_multiplies_v():
    q, k, v, mask = make_case(3, torch.float64, "bool")
    out, w = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    assert w.shape == (2, 3, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))
    assert (w[..., ~mask] == 0).all()
    torch.testing.assert_close(out, w @ v, atol=1e-12, rtol=0)
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + (~mask) * -1e9, -1) @ v
    torch.testing.assert_close(out, by_hand, atol=1e-10, rtol=0)


def test_worked_example_from_the_docs():
    """The numbers worked by hand in docs/attention.md."""
    Q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    K = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    out, w = scaled_dot_product_attention(Q, K, V, return_weights=True)
    expected_w = [[0.4011, 0.1978, 0.4011], [0.1084, 0.4458, 0.4458], [0.2483, 0.2483, 0.5035]]
    torch.testing.assert_close(w, torch.tensor(expected_w, dtype=torch.float64), atol=5e-5, rtol=0)
    expected = [[1.2033, 1.0000], [1.0000, 1.3374], [1.2552, 1.2552]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=5e-5, rtol=0)
    masked = scaled_dot_product_attention(Q, K, V, attn_mask=torch.tensor([True, True, False]))
    expected = [[0.6698, 0.3302], [0.1956, 0.8044], [0.5000, 0.5000]]
    torch.testing.assert_close(masked, torch.tensor(expected, dtype=torch.float64), atol=5e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros_not_nan(kind):
    q, k, v, _ = make_case(4, torch.float64, "none")
    q.requires_grad_(True)
    keep = torch.ones(5, 7, dtype=torch.bool)
    keep[1] = False  # row 1 may attend to nothing
    mask = keep if kind == "bool" else torch.zeros(5, 7).masked_fill(~keep, float("-inf"))
    out, w = scaled_dot_product_attention(
        q, k, v, mask.to(q.dtype) if kind != "bool" else mask, return_weights=True
    )
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (out[..., 1, :] == 0).all() and (w[..., 1, :] == 0).all()
    assert out[..., 0, :].abs().sum() > 0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, mask), atol=1e-10, rtol=0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_invalid_arguments_raise():
    q, k, v, _ = make_case(0, torch.float32, "none")
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError):
        MultiHeadAttention(10, 3)


def test_dropout_drops_and_zero_dropout_is_deterministic():
    q, k, v, _ = make_case(5, torch.float64, "none", lead=(4, 8), L=16, S=16)
    torch.manual_seed(0)
    _, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    zero_fraction = (w == 0).double().mean().item()  # 16384 Bernoulli(0.5) draws
    assert 0.47 < zero_fraction < 0.53
    kept = scaled_dot_product_attention(q, k, v, return_weights=True)[1]
    torch.testing.assert_close(w[w != 0], 2 * kept[w != 0])  # survivors rescaled by 1/(1-p)
    a, b = (scaled_dot_product_attention(q, k, v, dropout_p=0.0) for _ in range(2))
    assert torch.equal(a, b)

    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 6, 16)
    mha.train()
    assert not torch.equal(mha(x), mha(x))
    mha.eval()
    assert torch.equal(mha(x), mha(x))


# ---------------------------------------------------------------- transformers kernels


class FakeLayer(torch.nn.Module):
    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_transformers_eager_and_sdpa_kernels(dtype, groups):
    g = torch.Generator().manual_seed(7)
    B, H, L, E = 2, 4, 6, 8
    q = torch.randn(B, H, L, E, generator=g, dtype=dtype)  # (B, H, L, E)
    k = torch.randn(B, H // groups, L, E, generator=g, dtype=dtype)  # (B, Hkv, S, E)
    v = torch.randn(B, H // groups, L, E, generator=g, dtype=dtype)  # (B, Hkv, S, E)
    pad = torch.tensor([[1] * L, [1] * (L - 2) + [0, 0]], dtype=torch.bool)  # (B, S)
    module = FakeLayer(groups=groups).eval()
    from transformers.masking_utils import bidirectional_mask_function

    kw = dict(mask_function=bidirectional_mask_function, attention_mask=pad)
    bool_mask = sdpa_mask(B, L, L, **kw)  # (B, 1, L, S), True = attend
    float_mask = eager_mask(B, L, L, dtype=dtype, **kw)  # (B, 1, L, S), 0 or finfo.min
    assert bool_mask.dtype == torch.bool and float_mask.dtype == dtype

    ours, w = llmtune_attention_forward(module, q, k, v, bool_mask, scaling=0.4)
    assert ours.shape == (B, L, H, E) and w.shape == (B, H, L, L)
    ref, _ = sdpa_attention_forward(module, q, k, v, bool_mask, scaling=0.4)
    torch.testing.assert_close(ours, ref, atol=TOL[dtype], rtol=0)

    ours_f, w_f = llmtune_attention_forward(module, q, k, v, float_mask, scaling=0.4)
    kk, vv = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    ref_f, ref_w = eager_attention_forward(module, q, kk, vv, float_mask, scaling=0.4)
    torch.testing.assert_close(ours_f, ref_f, atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(w_f, ref_w, atol=TOL[dtype], rtol=0)


def test_none_mask_on_causal_module_is_causal_like_transformers_sdpa():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for is_causal in (True, False):
        module = FakeLayer(is_causal=is_causal).eval()
        ours, _ = llmtune_attention_forward(module, q, k, v, None)
        ref, _ = sdpa_attention_forward(module, q, k, v, None)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    # What would change the result is refused, not ignored: GPT-OSS's attention sinks gave
    # outputs 1.5 away from eager while matching eager with the sinks taken out.
    for name, value in [("softcap", 30.0), ("s_aux", torch.zeros(2)), ("sinks", torch.zeros(2))]:
        with pytest.raises(NotImplementedError, match=name):
            llmtune_attention_forward(module, q, k, v, None, **{name: value})
    llmtune_attention_forward(module, q, k, v, None, s_aux=None, sliding_window=None)  # unset: fine


def test_transformers_hook_uses_dropout_only_while_training():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    module = FakeLayer().eval()
    plain, _ = llmtune_attention_forward(module, q, k, v, None)
    evaluated, w_eval = llmtune_attention_forward(module, q, k, v, None, dropout=0.5)
    assert torch.equal(evaluated, plain) and (w_eval > 0).all()
    torch.manual_seed(0)
    trained, w_train = llmtune_attention_forward(module.train(), q, k, v, None, dropout=0.5)
    assert 0.45 < (w_train == 0).double().mean().item() < 0.55
    assert (trained - plain).abs().max() > 0.1


# ---------------------------------------------------------------- a real tiny BERT

CONFIG = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=3,
    initializer_range=0.2,
)  # larger than BERT's 0.02: peaked, non-uniform attention
INPUT_IDS = torch.tensor([[2, 15, 27, 33, 48, 61, 3], [2, 71, 19, 3, 0, 0, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
LABELS = torch.tensor([0, 2])


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**CONFIG)).eval()


def run_bert(model, impl, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK):
    """Logits, hidden states and parameter gradients of a copy of `model` using `impl`."""
    model = copy.deepcopy(model)
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=LABELS,
        output_hidden_states=True,
        output_attentions=impl != "sdpa",
    )
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_bert_with_registered_attention_matches_eager_and_sdpa(bert, reference):
    name = register()
    ours, our_grads = run_bert(bert, name)
    ref, ref_grads = run_bert(bert, reference)
    torch.testing.assert_close(ours.logits, ref.logits, atol=1e-5, rtol=0)
    real = ATTENTION_MASK.bool()  # compare hidden states on non-pad tokens only
    for h_ours, h_ref in zip(ours.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h_ours[real], h_ref[real], atol=1e-5, rtol=0)
    assert our_grads.keys() == ref_grads.keys() and len(our_grads) > 20
    for n in ref_grads:
        torch.testing.assert_close(our_grads[n], ref_grads[n], atol=1e-5, rtol=0, msg=n)
    if reference == "eager":  # same attention weights, padding keys get exactly 0
        for w_ours, w_ref in zip(ours.attentions, ref.attentions, strict=True):
            torch.testing.assert_close(w_ours, w_ref, atol=1e-5, rtol=0)
        assert (ours.attentions[0][1, :, :, 4:] == 0).all()


def test_from_pretrained_with_attn_implementation(bert, tmp_path):
    name = register()
    bert.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path, attn_implementation=name)
    assert loaded.config._attn_implementation == name
    with torch.no_grad():
        ours = loaded.eval()(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
        ref = bert(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_causal_decoder_bert_without_padding_matches_eager():
    torch.manual_seed(1)
    model = BertModel(BertConfig(**CONFIG, is_decoder=True)).eval()
    assert model.encoder.layer[0].attention.self.is_causal
    outs = {}
    for impl in ("eager", register()):
        model.set_attn_implementation(impl)
        with torch.no_grad():  # no padding: sdpa_mask returns None, causality via is_causal
            outs[impl] = model(input_ids=INPUT_IDS[:1], use_cache=False).last_hidden_state
    torch.testing.assert_close(outs["llmtune"], outs["eager"], atol=1e-5, rtol=0)


def test_unregistered_mask_trap_is_caught_and_register_fixes_it(bert):
    trap = "llmtune_without_mask"
    AttentionInterface.register(trap, llmtune_attention_forward)  # attention only, no mask
    try:
        assert trap not in AttentionMaskInterface._global_mapping
        ref = run_bert(bert, "eager")[0].logits
        bad = run_bert(bert, trap)[0].logits
        # Unpadded sequence still agrees; the padded one attends to padding and is wrong, by
        # far more than the 1e-5 tolerance of the comparison tests above.
        torch.testing.assert_close(bad[0], ref[0], atol=1e-5, rtol=0)
        assert (bad[1] - ref[1]).abs().max() > 0.05
        with pytest.raises(AssertionError):
            torch.testing.assert_close(bad, ref, atol=1e-5, rtol=0)
        register(trap)  # now also in AttentionMaskInterface: padding respected
        fixed = run_bert(bert, trap)[0].logits
        torch.testing.assert_close(fixed, ref, atol=1e-5, rtol=0)
    finally:
        AttentionInterface._global_mapping.pop(trap, None)
        AttentionMaskInterface._global_mapping.pop(trap, None)


def test_register_twice_is_harmless(bert):
    assert register() == register() == "llmtune"
    assert AttentionInterface._global_mapping["llmtune"] is llmtune_attention_forward
    assert AttentionMaskInterface._global_mapping["llmtune"] is sdpa_mask
    torch.testing.assert_close(
        run_bert(bert, "llmtune")[0].logits, run_bert(bert, "eager")[0].logits, atol=1e-5, rtol=0
    )


def test_multihead_from_bert_layer_equals_self_attention_plus_output_dense(bert):
    layer = bert.bert.encoder.layer[1]
    mha = MultiHeadAttention.from_bert_layer(layer).eval()
    assert (mha.num_heads, mha.head_dim) == (4, 8)
    torch.manual_seed(2)
    x = torch.randn(2, 7, 32)  # (B, L, D)
    pad = ATTENTION_MASK.bool()[:, None, None, :].expand(2, 1, 7, 7)  # (B, 1, L, S)
    self_attn = copy.deepcopy(layer.attention)
    self_attn.self.config._attn_implementation = "sdpa"  # takes the boolean mask
    with torch.no_grad():
        context = self_attn.self(x, attention_mask=pad)[0]  # (B, L, D)
        ref = self_attn.output.dense(context)  # before dropout / residual / LayerNorm
        full = self_attn(x, attention_mask=pad)[0]  # with residual + LayerNorm
        ours, w = mha(x, attention_mask=ATTENTION_MASK, return_weights=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - full).abs().max() > 1e-2  # the whole BertAttention is something else
    assert w.shape == (2, 4, 7, 7) and (w[1, :, :, 4:] == 0).all()


# ---------------------------------------------------------------- the example script


def test_heatmap_example_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("heatmap", ROOT / "examples/attention_heatmap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "heat.png"
    assert module.main(["--quick", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 2000
