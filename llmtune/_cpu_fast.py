"""Costs of training on a CPU, removed during `FineTuner.fit` without changing the maths.

Measured on all-MiniLM-L6-v2 with 2 AMD EPYC cores in bf16 (`benchmarks/README.md`):

- Dropout masks. torch's CPU dropout draws its mask one element at a time, about 4.6 ns
  each (1.8 ms for a 1,000-token x 384 activation), which is 17% of a training step. One
  64-bit ``random_`` draw takes about 3 ns and holds four 16-bit uniforms (0.4 ms for the
  same mask). An element is kept when its uniform is below (1 - p) * 2**16, so with
  probability 1 - p to within 2**-16 (p = 0.1 keeps 0.899994). That is finer than the bf16
  rounding of the 1 / (1 - p) scale that torch's own dropout applies (0.16% for p = 0.1);
  32-bit uniforms measured 0.7 ms. The kept elements are scaled by 1 / (1 - p), exactly as
  in ``nn.Dropout``. The mask comes
  from torch's default generator, so `seed` and checkpoints reproduce it; it is a different
  random stream from torch's. This covers the model's ``nn.Dropout`` modules and, through an
  attention function registered with transformers, the dropout on the attention
  probabilities inside SDPA (which, with dropout on a CPU, runs its unfused math path anyway).
- The word-embedding gradient. Its dense backward allocates a new vocab x hidden tensor every
  step (47 MB for MiniLM). glibc serves that size with fresh mmap pages, so every step pays
  page faults to zero it: 11.9 ms against 0.4 ms to zero a reused buffer, about 10% of a
  step. The sparse backward plus one reused dense buffer gives the optimizer the same
  gradient, and until then the gradient norm and clipping see only the rows the batch
  touched (the dense norm read all 47 MB every step).
- Three projections where one would do. An attention layer's query, key and value are three
  GEMMs on the same input, each casting it to bf16 again; one GEMM on the concatenated
  weights casts once, runs a wider (faster) matmul, and in backward returns the input's
  gradient from one GEMM instead of three GEMMs and two sums. The dot products are the
  same, summed within the GEMM's blocking (bit-identical outputs in MiniLM's bf16 shapes;
  fp32 may differ in the last bit), and the input's gradient is rounded once, not three times.

Everything is undone when `fit` returns: the model saves, predicts and trains in other loops
as before.
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._guard import Gradients
from .attention import scaled_dot_product_attention

ATTENTION = "llmtune_sdpa"
# Word embeddings that a running `FastPaths` block made sparse (see its nesting note).
_SPARSE: weakref.WeakSet[nn.Embedding] = weakref.WeakSet()
# Names of an attention module's query, key and value projections across encoder families:
# BERT/RoBERTa/ELECTRA/ALBERT, DistilBERT, most newer models, DeBERTa-v2/v3.
PROJECTIONS = (
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),
)


def keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Boolean mask of `shape`, each element True with probability 1 - p (to within 2**-16)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    uniform = words.view(torch.int16)[:n].view(shape)  # uniform over [-2**15, 2**15)
    return uniform < round((1 - p) * 2**16) - 2**15


def drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout with `keep_mask`: kept elements scaled by 1 / (1 - p), others 0."""
    # A mask in x's dtype, as in torch's dropout: multiplying by a bool tensor casts it on
    # every call, forward and backward, which measured twice as slow.
    return x * keep_mask(x.shape, p, x.device).to(x.dtype).mul_(1 / (1 - p))


def dropout_forward(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``nn.Dropout.forward`` with the cheaper CPU mask; identical outside training or off the CPU.

    Installed as the module instance's own ``forward``, so the module itself stays: hooks on
    it keep firing, and a change to its ``p`` during training takes effect.
    """
    if not module.training or not 0 < module.p < 1 or x.device.type != "cpu" or module.inplace:
        return F.dropout(x, module.p, module.training, module.inplace)
    return drop(x, module.p)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention, except CPU training with dropout on a bidirectional encoder.

    That case runs llmtune's one attention formula (`llmtune.attention`: scores in the
    autocast dtype, softmax in fp32) with `keep_mask` dropout plugged in on the weights.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    # Variants this formula does not cover go to SDPA, dropout and all.
    plain = all(
        kwargs.get(k) is None for k in ("position_bias", "softcap", "sliding_window", "s_aux", "head_mask")
    )
    if (
        not 0 < dropout < 1
        or query.device.type != "cpu"
        or causal
        or not plain
        or getattr(module, "num_key_value_groups", 1) != 1
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    mask = attention_mask  # boolean (B, 1, L, S), True = attend, or None
    output = scaled_dot_product_attention(query, key, value, mask, dropout, scale=scaling, dropout=drop)
    return output.transpose(1, 2).contiguous(), None  # (B, L, H, Ev)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class FusedProjections:
    """Sibling ``nn.Linear`` projections computed as one GEMM when called on the same input.

    The first of them called on an input computes all of them and keeps the others' slices;
    their own calls on that same tensor object take those. A call on another input (cross
    attention, DeBERTa's relative embeddings) computes everything afresh, so any call order
    is correct. Installed by overriding each module's ``forward`` on the instance: the
    parameters, their names and the state dict stay as they are.
    """

    def __init__(self, linears: tuple[nn.Linear, ...]) -> None:
        self.linears = linears
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}  # outputs computed, not yet asked for

    @staticmethod
    def fusable(linears: tuple[nn.Module, ...]) -> bool:
        first = linears[0]
        return all(
            type(m) is nn.Linear
            and m.in_features == first.in_features
            and (m.bias is None) == (first.bias is None)
            and m.weight.dtype == first.weight.dtype
            and m.weight.device == first.weight.device
            and "forward" not in m.__dict__  # someone else's per-instance forward stays
            for m in linears
        )

    def install(self) -> None:
        for i, linear in enumerate(self.linears):
            linear.forward = functools.partial(self.forward, i)

    def uninstall(self) -> None:
        for linear in self.linears:
            del linear.forward  # the instance attribute; the class's forward is back
        self._input, self._pending = None, {}

    def forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is self._input and i in self._pending:
            out = self._pending.pop(i)
            if not self._pending:
                self._input = None
            return out
        weight = torch.cat([m.weight for m in self.linears])
        bias = None if self.linears[0].bias is None else torch.cat([m.bias for m in self.linears])
        outputs = F.linear(x, weight, bias).split([m.out_features for m in self.linears], dim=-1)
        self._input = x
        self._pending = {j: out for j, out in enumerate(outputs) if j != i}
        return outputs[i]


def find_projections(model: nn.Module) -> list[FusedProjections]:
    """A `FusedProjections` for every module holding fusable query/key/value siblings."""
    found, taken = [], set()
    for module in model.modules():
        for names in PROJECTIONS:
            linears = tuple(getattr(module, name, None) for name in names)
            if (
                all(isinstance(m, nn.Module) for m in linears)
                and FusedProjections.fusable(linears)
                and not taken & {id(m) for m in linears}  # a Linear shared by two modules: once
            ):
                found.append(FusedProjections(linears))
                taken |= {id(m) for m in linears}
    return found


class FastPaths(Gradients):
    """Installs the fast paths on a model for the length of a `with` block.

    It is also the loop's gradient plug (`Gradients`): `tensors` gives the word-embedding
    gradient as its touched rows (to norm and clip with the other gradients), and
    `before_step` hands the optimizer the dense gradient.

    Args:
        model: the model being trained (its ``nn.Dropout`` modules, SDPA encoder, attention
            projections and word embedding are switched; anything else is left alone).
        sparse_embedding: route the word-embedding gradient through the sparse backward. Off
            under data parallelism, whose reducers want dense gradients.

    Nested blocks on one model (a fit started inside a running fit) share what the outer
    block installed, and only the block that installed a path removes it.
    """

    def __init__(self, model: nn.Module, sparse_embedding: bool = True) -> None:
        super().__init__(model)
        self.model = model
        self.sparse_embedding = sparse_embedding
        self._dropouts: list[nn.Dropout] = []  # given `dropout_forward` by this block
        self._encoder: nn.Module | None = None  # switched to ATTENTION, back to "sdpa" on exit
        self._projections: list[FusedProjections] = []
        self._embedding: nn.Embedding | None = None  # sparse while the block runs
        self._owns_embedding = False  # this block made it sparse (an outer one may have)
        self._buffer: torch.Tensor | None = None  # the dense gradient, reused every step
        self._written: torch.Tensor | None = None  # the buffer's rows that are not zero

    def __enter__(self) -> FastPaths:
        try:
            self._install()
        except BaseException:
            self.__exit__()  # whatever was installed before the failure goes again
            raise
        return self

    def _install(self) -> None:
        from transformers import PreTrainedModel

        for module in self.model.modules():
            if type(module) is nn.Dropout and "forward" not in module.__dict__:
                module.forward = types.MethodType(dropout_forward, module)
                self._dropouts.append(module)
        self._projections = find_projections(self.model)
        for fused in self._projections:
            fused.install()
        encoders = [m for m in self.model.modules() if isinstance(m, PreTrainedModel)]
        if encoders and encoders[0].config._attn_implementation == "sdpa":
            _register_attention()
            encoders[0].set_attn_implementation(ATTENTION)
            self._encoder = encoders[0]
        embedding = encoders[0].get_input_embeddings() if encoders else None
        if not (self.sparse_embedding and type(embedding) is nn.Embedding and embedding.weight.requires_grad):
            return
        if embedding in _SPARSE:  # an outer block's: gradients arrive sparse here too
            self._embedding = embedding
        elif not embedding.sparse:  # a user's own sparse embedding is left to the user
            embedding.sparse, self._embedding, self._owns_embedding = True, embedding, True
            _SPARSE.add(embedding)

    def tensors(self) -> list[torch.Tensor]:
        """The gradients to norm and clip: the dense ones, and the sparse one's touched rows."""
        dense = [g for g in super().tensors() if not g.is_sparse]
        rows = self.sparse_rows()
        return dense + ([rows] if rows is not None else [])

    def before_step(self) -> None:
        self.densify()

    def _sparse_grad(self) -> torch.Tensor | None:
        """The word-embedding gradient, coalesced in place, while it is sparse; else None."""
        if self._embedding is None:
            return None
        weight = self._embedding.weight
        if weight.grad is None or not weight.grad.is_sparse:
            return None
        weight.grad = weight.grad.coalesce()  # returns itself once coalesced
        return weight.grad

    def sparse_rows(self) -> torch.Tensor | None:
        """The sparse word-embedding gradient's values, one row per token id; None if none.

        Coalesces the gradient (a token seen twice, or in two accumulated batches, gets one
        summed row) and returns its values as a view: scaling it in place scales the gradient.
        Its norm is the dense gradient's norm, at ~1,000 rows instead of the vocabulary.
        """
        grad = self._sparse_grad()
        return None if grad is None else grad._values()

    def densify(self) -> None:
        """Make the sparse word-embedding gradient dense, in a buffer reused every step."""
        grad = self._sparse_grad()
        if grad is None:
            return
        weight = self._embedding.weight
        rows = grad._indices()[0]
        if self._buffer is None:
            self._buffer = torch.zeros_like(weight)
        else:  # only the rows written last step are not zero
            self._buffer.index_fill_(0, self._written, 0)
        self._buffer.index_copy_(0, rows, grad._values())
        self._written = rows
        weight.grad = self._buffer

    def __exit__(self, *exc: object) -> None:
        for module in self._dropouts:
            del module.forward  # the instance attribute; the class's forward is back
        for fused in self._projections:
            fused.uninstall()
        if self._encoder is not None:
            self._encoder.set_attn_implementation("sdpa")
        if self._embedding is not None:
            grad = self._embedding.weight.grad
            if grad is not None and grad.is_sparse:
                self._embedding.weight.grad = grad.to_dense()
        if self._owns_embedding:
            self._embedding.sparse = False
            _SPARSE.discard(self._embedding)
        self._dropouts, self._projections, self._encoder = [], [], None
        self._embedding, self._owns_embedding, self._buffer, self._written = None, False, None, None
