"""Scaled dot-product attention written out in plain tensor operations.

A pure function, a multi-head module that can copy a BERT layer, and a hook into transformers.

Notation used throughout (shapes as in ``torch.nn.functional.scaled_dot_product_attention``)::

    B      batch size                 H     number of heads
    L      query length (rows)        S     key/value length (columns)
    E      query/key width = d_k      Ev    value width
    D      model width = H * E        ...   any leading batch dimensions, e.g. (B, H)

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

* ``Q`` (..., L, E): one query vector per position that is *looking*.
* ``K`` (..., S, E): one key vector per position that can be *looked at*.
* ``V`` (..., S, Ev): the content each position hands over when it is looked at.
* ``Q K^T`` (..., L, S): entry (i, j) is the dot product q_i . k_j, "how well key j fits query i".
* ``1 / sqrt(d_k)``: if q and k have d_k independent entries of mean 0 and variance 1, then
  q . k is a sum of d_k such products and has variance d_k. Without the scaling the scores grow
  like sqrt(d_k), softmax saturates to a near one-hot vector and its gradient vanishes.
  Dividing by sqrt(d_k) brings the variance back to 1 whatever the head width.
* ``M`` (broadcastable to (..., L, S)): the mask. 0 where attending is allowed, -inf where it is
  not, so exp(-inf) = 0 gives that key no weight at all. A boolean mask (True = attend) means
  the same thing. A row in which every key is masked has nothing to average; we return zeros.
* ``softmax`` over the last axis (S): each row becomes non-negative weights that sum to 1.
* ``... V``: the weights multiply **V itself**, giving for each query a weighted average of
  the value vectors. (Some write-ups multiply by a weight matrix W^V here instead; that is
  wrong. W^V is the learned projection that *produced* V = X W^V, applied before attention.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "MultiHeadAttention",
    "llmtune_attention_forward",
    "register",
    "scaled_dot_product_attention",
    "torch_dropout",
]


def torch_dropout(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout: zero each weight with probability p, scale the rest by 1 / (1 - p)."""
    return nn.functional.dropout(weights, p=p, training=True)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    dropout: Callable[[torch.Tensor, float], torch.Tensor] = torch_dropout,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Compute softmax(Q K^T * scale + M) V, the same contract as torch's fused kernel.

    Args:
        query: Queries Q, shape (..., L, E).
        key: Keys K, shape (..., S, E).
        value: Values V, shape (..., S, Ev).
        attn_mask: Optional mask broadcastable to (..., L, S). Boolean: True = may attend.
            Float: added to the scores (0 = keep, -inf = block, other values bias the score).
        dropout_p: Probability of zeroing an attention weight (the survivors are rescaled by
            1 / (1 - p)). Applied whenever > 0, like torch; pass 0.0 at evaluation time.
        is_causal: If True, query i may only attend to keys j <= i (top-left aligned, as torch).
            Combined with ``attn_mask`` (both must allow a position) when both are given.
        scale: Multiplier of the scores; defaults to 1 / sqrt(E).
        return_weights: Also return the attention weights that multiplied V.
        dropout: ``dropout(weights, p)``, the dropout applied to the weights when p > 0;
            torch's by default (the CPU fast paths plug in a cheaper mask here).

    Returns:
        The output, shape (..., L, Ev); or ``(output, weights)`` with weights (..., L, S)
        if ``return_weights``. Rows whose keys are all masked get zero weights and zero output.

    Raises:
        ValueError: If the query and key widths differ or ``dropout_p`` is not in [0, 1].
    """
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query width {query.shape[-1]} != key width {key.shape[-1]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale

    # Which keys each query may see: the causal pattern and the mask together, (..., L, S).
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril() if is_causal else None
    if attn_mask is not None:
        given = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        allowed = given if allowed is None else allowed & given

    # In place from here on: no backward reads these (..., L, S) copies, so each is one less.
    scores = torch.matmul(query, key.transpose(-2, -1)).mul_(scale)  # (..., L, S)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.masked_fill(~allowed, 0.0)  # (..., L, S); -inf comes next
    if allowed is not None:
        # A row with every key blocked would be softmax(-inf, ..., -inf) = 0/0 = NaN. Such a
        # row keeps its finite scores, so softmax (and its gradient) stays finite, and its
        # weights are zeroed below.
        has_key = allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
        scores = scores.masked_fill_(has_key & ~allowed, float("-inf"))  # (..., L, S)
    # Softmax in at least fp32: in bf16 its sums lose the small weights. Then back to V's type.
    exact = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=exact).to(value.dtype)  # (..., L, S)
    if allowed is not None:
        weights = weights * has_key  # (..., L, S)
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)  # (..., L, S)
    output = torch.matmul(weights, value)  # (..., L, Ev): weights times V, not times W^V
    return (output, weights) if return_weights else output


# Attention inputs that change the result and that this does not compute: refused, not ignored.
UNSUPPORTED = ("position_bias", "softcap", "s_aux", "sinks", "indices", "head_mask")


def llmtune_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention function in the signature of ``transformers.AttentionInterface``.

    Mirrors ``transformers.integrations.sdpa_attention.sdpa_attention_forward``, whose mask
    function (``masking_utils.sdpa_mask``) we register with it: the mask arrives as a boolean
    (B, 1, L, S) tensor (True = attend) or as ``None`` when there is no padding. A ``None`` mask
    on a causal module (``module.is_causal``, or ``is_causal`` in kwargs) with L > 1 means
    "use the causal pattern", because ``sdpa_mask`` leaves that to the kernel's ``is_causal``.

    Args:
        module: The calling attention layer; read for ``training``, ``is_causal`` and
            ``num_key_value_groups`` (grouped-query attention).
        query: (B, H, L, E).
        key: (B, Hkv, S, E), Hkv = H / num_key_value_groups.
        value: (B, Hkv, S, Ev).
        attention_mask: Boolean or additive float mask broadcastable to (B, H, L, S), or None.
        scaling: Score multiplier; None means 1 / sqrt(E).
        dropout: Dropout on the weights, only used while ``module.training``.
        **kwargs: ``is_causal`` is honoured; those in ``UNSUPPORTED`` are refused when set;
            other transformers kwargs (sliding windows arrive in the mask) are ignored.

    Returns:
        ``(attn_output, attn_weights)``: output (B, L, H, Ev) and weights (B, H, L, S).

    Raises:
        NotImplementedError: For ``position_bias``, ``softcap``, attention sinks (``s_aux``,
            ``sinks``: GPT-OSS) or packed ``indices``, which this does not support.
    """
    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported:  # computing without them would be another model's attention, silently
        raise NotImplementedError(f"llmtune attention does not support {', '.join(unsupported)}")
    groups = getattr(module, "num_key_value_groups", 1)
    key = key.repeat_interleave(groups, dim=1)  # (B, H, S, E)
    value = value.repeat_interleave(groups, dim=1)  # (B, H, S, Ev)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    output, weights = scaled_dot_product_attention(
        query,  # (B, H, L, E)
        key,  # (B, H, S, E)
        value,  # (B, H, S, Ev)
        attn_mask=attention_mask,  # (B, 1, L, S) or None
        dropout_p=dropout if module.training else 0.0,
        is_causal=is_causal,
        scale=scaling,
        return_weights=True,
    )  # (B, H, L, Ev), (B, H, L, S)
    return output.transpose(1, 2).contiguous(), weights  # (B, L, H, Ev), (B, H, L, S)


def register(name: str = "llmtune") -> str:
    """Make ``attn_implementation=name`` run :func:`llmtune_attention_forward` in transformers.

    Two registries must learn the name. ``AttentionInterface`` maps it to the attention
    function. ``masking_utils.AttentionMaskInterface`` maps it to the function that turns the
    [B, S] 0/1 padding mask into the 4D mask; we reuse ``sdpa_mask`` (boolean, True = attend).
    If only the first is done, ``create_bidirectional_mask`` sees an unknown name, returns
    ``None`` and every padding token is silently attended to. Registering again is harmless.

    Args:
        name: The implementation name, for ``model.set_attn_implementation(name)`` or
            ``from_pretrained(..., attn_implementation=name)``.

    Returns:
        The registered name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, llmtune_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention: project, split into heads, attend, merge, project back.

    With X (B, L, D): Q = X W^Q, K = X W^K, V = X W^V (the ``query``/``key``/``value`` Linear
    layers), each cut into H heads of width E = D / H; every head attends independently; the
    heads are concatenated back to (B, L, D) and mixed by W^O (the ``out`` Linear layer).

    Args:
        embed_dim: Model width D.
        num_heads: Number of heads H; must divide ``embed_dim``.
        dropout: Dropout probability on the attention weights while training.
        bias: Whether the four projections have a bias.

    Raises:
        ValueError: If ``num_heads`` does not divide ``embed_dim``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.query = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.key = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.value = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, E)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attend over ``hidden_states``.

        Args:
            hidden_states: X, shape (B, L, D).
            attention_mask: Optional padding mask (B, L) of 1 (real token) / 0 (padding); no
                query attends to a padding key. Padding rows still get (ignorable) outputs.
            return_weights: Also return the attention weights.

        Returns:
            Output (B, L, D); or ``(output, weights)`` with weights (B, H, L, L).
        """
        B, L, D = hidden_states.shape
        q = self._split_heads(self.query(hidden_states))  # (B, H, L, E)
        k = self._split_heads(self.key(hidden_states))  # (B, H, L, E)
        v = self._split_heads(self.value(hidden_states))  # (B, H, L, E)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L) broadcasts over H, L
        context, weights = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=True,
        )  # (B, H, L, E), (B, H, L, L)
        context = context.transpose(1, 2).reshape(B, L, D)  # (B, L, D): heads merged
        output = self.out(context)  # (B, L, D)
        return (output, weights) if return_weights else output

    @classmethod
    def from_bert_layer(cls, layer: nn.Module) -> MultiHeadAttention:
        """Copy the attention weights of a transformers ``BertLayer``.

        Uses ``layer.attention.self.{query,key,value}`` and ``layer.attention.output.dense``.
        The result equals BertSelfAttention followed by ``attention.output.dense`` only: BERT's
        output block then applies dropout, adds the residual input and a LayerNorm, which are
        not part of attention and are not copied.

        Args:
            layer: A ``transformers.models.bert.modeling_bert.BertLayer`` (or look-alike).

        Returns:
            A new MultiHeadAttention with copies of the weights, same device and dtype.
        """
        self_attn, dense = layer.attention.self, layer.attention.output.dense
        mha = cls(
            embed_dim=self_attn.query.in_features,
            num_heads=self_attn.num_attention_heads,
            dropout=self_attn.dropout.p,
            bias=self_attn.query.bias is not None,
        ).to(device=dense.weight.device, dtype=dense.weight.dtype)
        for ours, theirs in [
            (mha.query, self_attn.query),
            (mha.key, self_attn.key),
            (mha.value, self_attn.value),
            (mha.out, dense),
        ]:
            ours.load_state_dict(theirs.state_dict())
        return mha
