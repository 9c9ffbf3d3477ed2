"""The CPU fast paths keep the maths: dropout's distribution and scale, attention, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import sentiment_texts
from families import FAMILIES, tiny_backbone

from llmtune import Callback, DatasetAdapter, FineTuner, OptimizerFactory
from llmtune._cpu_fast import (
    ATTENTION,
    FastPaths,
    FusedProjections,
    attention_forward,
    drop,
    dropout_forward,
    find_projections,
    keep_mask,
)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    n = 1_000_001  # not a multiple of 4: the last 64-bit draw is partly used
    mask = keep_mask((n,), p)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    # Five standard deviations of a binomial proportion.
    assert abs(mask.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_keep_mask_is_reproducible_and_its_quarters_uncorrelated():
    torch.manual_seed(3)
    a = keep_mask((4, 1001), 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((4, 1001), 0.5))
    # Each 64-bit draw feeds four neighbouring elements; none may echo another.
    quarters = keep_mask((400_000,), 0.5).view(-1, 4).float()
    correlation = torch.corrcoef(quarters.T) - torch.eye(4)
    assert correlation.abs().max() < 0.02


def test_drop_scales_kept_and_zeroes_dropped_with_matching_gradient():
    x = torch.rand(64, 33, dtype=torch.float64) + 0.5
    x.requires_grad_()
    y = drop(x, 0.25)
    kept = y != 0
    assert 0.6 < kept.double().mean() < 0.9
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / 0.75)


def test_dropout_forward_is_identity_in_eval_and_like_nn_dropout_in_training():
    x = torch.randn(8, 16)
    module = torch.nn.Dropout(0.3)
    assert torch.equal(dropout_forward(module.eval(), x), x)
    out = dropout_forward(module.train(), x)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.7)
    assert torch.equal(dropout_forward(torch.nn.Dropout(0.0).train(), x), x)
    assert torch.equal(dropout_forward(torch.nn.Dropout(1.0).train(), x), torch.zeros_like(x))


def _qkv_mask(dtype=torch.float64):
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False  # the second sequence has two padding positions
    return q, k, v, mask


class _Layer(torch.nn.Module):
    is_causal = False


def test_attention_with_dropout_equals_the_formula_with_the_same_mask():
    q, k, v, mask = _qkv_mask()
    torch.manual_seed(5)
    out, _ = attention_forward(_Layer(), q, k, v, mask, dropout=0.2, scaling=0.5)
    torch.manual_seed(5)
    keep = keep_mask((2, 3, 5, 5), 0.2).double() / 0.8
    scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, -math.inf)
    reference = (torch.softmax(scores, -1) * keep) @ v  # (B, H, L, E)
    torch.testing.assert_close(out, reference.transpose(1, 2))


def test_attention_without_dropout_is_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask = _qkv_mask()
    out, _ = attention_forward(_Layer(), q, k, v, mask, dropout=0.0)
    expected, _ = sdpa_attention_forward(_Layer(), q, k, v, mask, dropout=0.0)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_projections_equal_three_linears_in_any_order(precision):
    torch.manual_seed(0)
    linears = tuple(torch.nn.Linear(16, n) for n in (16, 16, 8))
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        separate = [m(x) for m in linears]
        fused = FusedProjections(linears)
        fused.install()
        try:
            order = [2, 0, 1]  # value first, then query, then key
            outputs = {i: linears[i](x) for i in order}
            other = torch.randn(2, 16)  # another input (cross attention) is computed afresh
            cross = linears[1](other)
        finally:
            fused.uninstall()
    for i in range(3):  # the same dot products, summed in a GEMM's blocking: within rounding
        torch.testing.assert_close(outputs[i], separate[i])
    torch.testing.assert_close(cross, linears[1](other).to(cross.dtype))
    assert all("forward" not in m.__dict__ for m in linears)
    # Gradients reach all three weights and the shared input, as without fusion.
    grads = []
    for fuse in (False, True):
        xi = x.clone().requires_grad_()
        fused.install() if fuse else None
        try:
            loss = sum((m(xi) * (i + 1)).sum() for i, m in enumerate(linears))
        finally:
            fused.uninstall() if fuse else None
        grads.append(torch.autograd.grad(loss, [xi, *(m.weight for m in linears)]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_projections_shared_or_already_patched_are_left_alone():
    shared = tuple(torch.nn.Linear(8, 8) for _ in range(3))
    model = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module(), torch.nn.Module()])
    for module in model[:2]:  # two attention modules holding the same three Linears
        module.query, module.key, module.value = shared
    own = tuple(torch.nn.Linear(8, 8) for _ in range(3))
    model[2].q_proj, model[2].k_proj, model[2].v_proj = own
    own[0].forward = lambda x: x  # a user's per-instance forward
    assert [f.linears for f in find_projections(model)] == [shared]


def test_fast_paths_install_and_undo(make_model):
    model = make_model()
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    embedding = model.encoder.get_input_embeddings()
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), FastPaths(model):
        assert all(m.forward.__func__ is dropout_forward for m in originals)
        assert model.encoder.config._attn_implementation == ATTENTION
        assert embedding.sparse
        query = model.encoder.encoder.layer[0].attention.self.query
        assert "forward" in query.__dict__  # fused with key and value
        assert list(model.state_dict()) == keys
        raise RuntimeError("boom")
    assert [m for m in model.modules() if isinstance(m, torch.nn.Dropout)] == originals
    assert model.encoder.config._attn_implementation == "sdpa"
    assert not embedding.sparse
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_sparse_rows_norm_and_scale_the_embedding_gradient_then_densify_clears_old_rows(make_model):
    """Two steps through the sparse route give the dense gradients, norms and clipping."""
    model = make_model(dropout=0.0)
    embedding = model.encoder.get_input_embeddings()
    batches = [torch.tensor([[5, 6, 6, 7]]), torch.tensor([[8, 9, 5, 9]])]  # repeats sum
    dense = []
    for ids in batches:
        embedding.weight.grad = None
        model(input_ids=ids).sum().backward()
        dense.append(embedding.weight.grad.clone())
    with FastPaths(model) as fast:
        for ids, expected in zip(batches, dense):
            embedding.weight.grad = None
            model(input_ids=ids).sum().backward()
            rows = fast.sparse_rows()
            torch.testing.assert_close(rows.norm(), expected.norm())
            rows.mul_(0.5)  # clipping scales the gradient through this view
            fast.densify()
            assert not embedding.weight.grad.is_sparse
            torch.testing.assert_close(embedding.weight.grad, expected * 0.5)


def test_fast_paths_leave_other_attention_alone(make_model):
    model = make_model()
    model.encoder.set_attn_implementation("eager")
    with FastPaths(model, sparse_embedding=False):
        assert model.encoder.config._attn_implementation == "eager"
        assert not model.encoder.get_input_embeddings().sparse
    assert model.encoder.config._attn_implementation == "eager"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fast_training_equals_torch_kernels_without_dropout(make_model, grad_accum):
    """With dropout off the fast paths differ only in fp32 rounding.

    The routes differ (embedding gradient, its norm over touched rows, one fused Q/K/V GEMM
    whose input gradient sums in another order); 1e-5 is 1% of one AdamW step at lr 1e-3.
    """
    texts, labels = sentiment_texts(48)
    data = DatasetAdapter.from_lists(texts, labels)
    model = make_model(dropout=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {}
    for fast in (False, True):
        model.load_state_dict(start)
        tuner = FineTuner(
            model,
            optimizer=OptimizerFactory.adamw(lr=1e-3, weight_decay=0.01),
            epochs=1,
            batch_size=8,
            grad_accum=grad_accum,
            precision="fp32",
            progress=False,
            keep_best=False,
            fast_cpu=fast,
        )
        tuner.fit(data)
        weights[fast] = {k: v.clone() for k, v in model.state_dict().items()}
    word = "encoder.embeddings.word_embeddings.weight"
    assert not torch.equal(weights[True][word], start[word]), "the word embeddings must train"
    for key in start:
        torch.testing.assert_close(weights[True][key], weights[False][key], rtol=1e-5, atol=1e-5)
    assert model.encoder.get_input_embeddings().weight.grad is None  # freed, not left sparse


def test_fast_training_with_dropout_learns_and_is_reproducible(make_model):
    """`test_net_learns` (fast paths on by default) shows learning; here the run repeats exactly."""
    texts, labels = sentiment_texts(240)
    data = DatasetAdapter.from_lists(texts, labels)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = make_model(dropout=0.1)
        tuner = FineTuner(
            model,
            optimizer=OptimizerFactory.adamw(lr=3e-3),
            epochs=6,
            batch_size=16,
            progress=False,
            keep_best=False,
        )
        history = tuner.fit(data)
        results.append((history.train_loss, model.state_dict()["head.weight"].clone()))
    (losses, head), (losses2, head2) = results
    assert losses[-1] < 0.5 * losses[0]
    assert losses == losses2 and torch.equal(head, head2)


# Query/key/value triplets fused per family: one per layer; ALBERT's two layers share one;
# ModernBERT (Wqkv) and GPT-2 (c_attn) compute them as one GEMM already.
FUSED = {"albert": 1, "modernbert": 0, "gpt2": 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_paths_on_every_family(family):
    """Each family trains a step under the fast paths and comes back unchanged."""
    encoder = tiny_backbone(family).train()
    attention = encoder.config._attn_implementation
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    reference = encoder.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    with FastPaths(encoder) as fast:
        assert len(fast._projections) == FUSED.get(family, 2)
        fused = encoder.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = encoder.train()(input_ids=ids, attention_mask=mask).last_hidden_state
        # A random projection: a plain sum after the final LayerNorm has zero gradient.
        (hidden * torch.randn_like(hidden)).sum().backward()
        fast.densify()
    torch.testing.assert_close(fused, reference)
    grad = encoder.get_input_embeddings().weight.grad
    assert grad is not None and not grad.is_sparse and grad.abs().sum() > 0
    assert encoder.config._attn_implementation == attention
    assert not any("forward" in m.__dict__ for m in encoder.modules())


def test_dropout_hooks_keep_firing_and_a_change_during_fit_is_kept(make_model):
    model = make_model()
    texts, labels = sentiment_texts(16)
    calls = []
    dropout = model.dropout  # the head's; the encoder's are patched the same way
    dropout.register_forward_hook(lambda module, inputs, output: calls.append(module.p))

    class NoDropoutFromEpoch2(Callback):
        def on_epoch_start(self, tuner, state, **kwargs):
            if state.epoch == 1:
                dropout.p = 0.0

    FineTuner(model, epochs=2, batch_size=8, progress=False, callbacks=[NoDropoutFromEpoch2()]).fit(
        DatasetAdapter.from_lists(texts, labels)
    )
    assert calls[:2] == [0.1, 0.1] and calls[-1] == 0.0  # fired in both epochs, saw the change
    assert dropout.p == 0.0 and "forward" not in dropout.__dict__


def test_a_fit_inside_a_running_fit_trains_and_undoes_only_its_own_paths(make_model):
    model = make_model()
    texts, labels = sentiment_texts(16)
    data = DatasetAdapter.from_lists(texts, labels)
    embedding = model.encoder.get_input_embeddings()
    inner = []

    class InnerFit(Callback):
        def on_epoch_end(self, tuner, state, **kwargs):
            before = [p.detach().clone() for p in model.parameters()]
            FineTuner(model, epochs=1, batch_size=8, progress=False, keep_best=False).fit(data)
            changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
            inner.append((sum(changed), embedding.sparse))

    FineTuner(model, epochs=2, batch_size=8, progress=False, callbacks=[InnerFit()]).fit(data)
    # The inner fits trained every parameter, word embedding included, and left the outer
    # fit's sparse embedding in place; the outer fit undid everything at its end.
    assert inner == [(len(list(model.parameters())), True)] * 2
    assert not embedding.sparse and not any("forward" in m.__dict__ for m in model.modules())


def test_a_failure_while_installing_undoes_what_was_installed(make_model, monkeypatch):
    model = make_model()
    import llmtune._cpu_fast as fast_module

    def broken(model):
        raise RuntimeError("projections")

    monkeypatch.setattr(fast_module, "find_projections", broken)
    with pytest.raises(RuntimeError, match="projections"), FastPaths(model):
        pass
    assert not any("forward" in m.__dict__ for m in model.modules())  # the dropouts are back
