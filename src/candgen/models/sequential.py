"""Sequential user encoders: SASRec, BSARec and an HSTU-style sequential transducer.

Both read a left-padded item sequence and emit a user state after every position, trained to
predict the next item (a generative retrieval objective); their input item embeddings are also the
output embeddings that the ANN index serves.
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from candgen.data.tensors import Batch
from candgen.errors import ConfigError
from candgen.models.base import RetrievalModel, Similarity


class FastDropout(nn.Module):
    """Dropout whose keep-mask comes from random bytes, 8 per 64-bit draw.

    Torch's CPU dropout draws one Bernoulli a value, and on Beauty it took 15% of a BSARec
    training step (the profile in docs/benchmarks/quality_notes.md); a byte per value is 3.5x
    cheaper. The rate
    is rounded to a multiple of 1/256 (0.5 exactly; 0.2 becomes 0.199).

    Args:
        p: the share of values zeroed in training.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.threshold = round(p * 256)
        self.scale = 1.0 / (1.0 - self.threshold / 256) if self.threshold < 256 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), device=x.device)
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * (keep.to(x.dtype) * self.scale)


class _SequenceEncoder(RetrievalModel):
    """Shared parts: the item table (input and output), learned positions, the final norm (or,
    with ``input_norm``, the norm of the input)."""

    input_norm = False

    def __init__(
        self,
        num_items: int,
        dim: int,
        max_len: int,
        dropout: float,
        similarity: Similarity,
        temperature: float,
    ) -> None:
        super().__init__(num_items, similarity, temperature)
        self.dim = dim
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=1.0 / math.sqrt(dim))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_dropout = FastDropout(dropout)
        self.ln = nn.LayerNorm(dim)

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., D) the shared input/output vectors of item ids (before scaling or norm)."""
        vectors: torch.Tensor = self.item_emb(ids)
        return vectors

    def raw_item_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self._item_vectors(ids)

    def _input(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) scaled item + position embeddings (zero at padding) and the (B, L, 1) mask."""
        n = items.shape[1]
        if n > self.max_len:
            raise ConfigError("items", f"sequence length {n} > max_len {self.max_len}")
        mask = (items > 0).unsqueeze(-1)
        pos = torch.arange(self.max_len - n, self.max_len, device=items.device)
        if self.input_norm:  # post-norm layers (BSARec) expect normalised, unscaled input
            x = self.ln(self._item_vectors(items) + self.pos_emb(pos))
        else:
            x = self._item_vectors(items) * math.sqrt(self.dim) + self.pos_emb(pos)
        return self.emb_dropout(x) * mask, mask


class _CausalSelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), FastDropout(dropout), nn.Linear(dim, dim)
        )
        self.dropout = FastDropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        out: torch.Tensor = x + self.dropout(self.ffn(self.ln2(x)))
        return out


class SASRec(_SequenceEncoder):
    """SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence.

    Trained here with (sampled) softmax rather than the original binary cross-entropy.

    Args:
        num_items: catalogue size (ids 1..num_items, 0 = padding).
        dim: embedding width.
        max_len: longest input sequence.
        num_blocks: self-attention blocks.
        num_heads: attention heads (must divide dim).
        dropout: dropout rate.
        similarity: ``dot`` (SASRec's own) or ``cosine``.
        temperature: softmax temperature.
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        max_len: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        similarity: Similarity = "dot",
        temperature: float = 1.0,
    ) -> None:
        super().__init__(num_items, dim, max_len, dropout, similarity, temperature)
        self.blocks = nn.ModuleList(
            _CausalSelfAttentionBlock(dim, num_heads, dropout) for _ in range(num_blocks)
        )

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        items = batch["items"]
        x, mask = self._input(items)
        allowed = _attention_mask(items)
        for block in self.blocks:
            x = block(x, allowed) * mask
        states: torch.Tensor = self.ln(x)
        return states


def _attention_mask(items: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) which keys each position may attend to: the items up to it, never padding
    (a padding position attends to itself alone, so that its softmax is defined), so that the
    states do not depend on how much padding precedes the sequence."""
    n = items.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=items.device).tril()
    itself = torch.eye(n, dtype=torch.bool, device=items.device)
    return (causal[None] & ((items > 0)[:, None, :] | itself)).unsqueeze(1)


class _FrequencyAttentionBlock(nn.Module):
    """One BSARec layer (post-norm): a low-pass/high-pass filter of the window over positions,
    mixed with causal self-attention, then a GELU feed-forward 4x as wide."""

    def __init__(
        self, dim: int, heads: int, dropout: float, max_len: int, cutoff: int, weight: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.max_len = max_len
        self.keep = cutoff // 2 + 1  # rfft bins kept by the low-pass (BSARec's c // 2 + 1)
        self.weight = weight
        self.sqrt_beta = nn.Parameter(torch.randn(1, 1, dim))
        self.filter_ln = nn.LayerNorm(dim, eps=1e-12)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_ln = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ffn_ln = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = FastDropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # The window's padding is zero, so filtering the items right-aligned at max_len is
        # filtering them zero-padded on the right, shifted (the filter is circular): the same
        # states whatever padding the batch kept.
        spectrum = torch.fft.rfft(x, n=self.max_len, dim=1, norm="ortho")
        spectrum[:, self.keep :] = 0
        low = torch.fft.irfft(spectrum, n=self.max_len, dim=1, norm="ortho")[:, :n]
        filtered = low + self.sqrt_beta**2 * (x - low)
        dsp = self.filter_ln(self.dropout(filtered) + x)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=allowed,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        gsp = self.attn_ln(self.dropout(self.proj(a.transpose(1, 2).reshape(b, n, d))) + x)
        h = self.weight * dsp + (1.0 - self.weight) * gsp
        out: torch.Tensor = self.ffn_ln(self.dropout(self.ffn(h)) + h)
        return out


class BSARec(_SequenceEncoder):
    """BSARec (Shin et al., AAAI 2024): self-attention beside a learned low/high-frequency
    filter of the sequence, the inductive bias attention lacks for fine-grained patterns.

    The filter reads the whole window, so only the last position may be trained
    (``examples=prefixes``); trained with the full softmax, as its authors train it.

    Args:
        num_items: catalogue size (ids 1..num_items, 0 = padding).
        dim: embedding width.
        max_len: longest input sequence (the filter's length).
        num_blocks: layers.
        num_heads: attention heads (must divide dim).
        dropout: dropout rate (hidden and attention).
        cutoff: BSARec's c: the low-pass keeps cutoff // 2 + 1 frequencies.
        weight: BSARec's alpha: the filter's share against attention's.
        temperature: softmax temperature.
    """

    input_norm = True

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        max_len: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.5,
        cutoff: int = 5,
        weight: float = 0.7,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(num_items, dim, max_len, dropout, "dot", temperature)
        self.blocks = nn.ModuleList(
            _FrequencyAttentionBlock(dim, num_heads, dropout, max_len, cutoff, weight)
            for _ in range(num_blocks)
        )
        for module in self.modules():  # BERT's initialisation, as BSARec's
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        items = batch["items"]
        x, mask = self._input(items)
        allowed = _attention_mask(items)
        for block in self.blocks:
            x = block(x, allowed) * mask
        states: torch.Tensor = x
        return states


class _HSTUBlock(nn.Module):
    """One HSTU layer: pointwise SiLU attention with relative position and time biases."""

    def __init__(
        self, dim: int, heads: int, max_len: int, time_buckets: int, dropout: float
    ) -> None:
        super().__init__()
        self.heads = heads
        self.ln_in = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.ln_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = FastDropout(dropout)
        self.pos_bias = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))
        self.time_bias = (
            nn.Parameter(torch.zeros(heads, time_buckets + 1)) if time_buckets else None
        )
        self.max_len = max_len
        self.time_buckets = time_buckets

    def forward(
        self, x: torch.Tensor, causal: torch.Tensor, time_bucket: torch.Tensor | None
    ) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        u, v, q, k = F.silu(self.uvqk(self.ln_in(x))).view(b, n, 4, h, d // h).unbind(2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d // h)
        idx = torch.arange(n, device=x.device)
        rel = (idx[None, :] - idx[:, None]) + self.max_len - 1
        scores = scores + self.pos_bias[:, rel][None]
        if time_bucket is not None and self.time_bias is not None:
            scores = scores + self.time_bias[:, time_bucket].permute(1, 0, 2, 3)
        # Pointwise (not softmax) attention, normalised by the longest sequence as in HSTU (a
        # constant, so that a state does not depend on the padding before it).
        attn = F.silu(scores) * causal / self.max_len
        y = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, d)
        y = self.out(self.ln_attn(y) * u.reshape(b, n, d))
        out: torch.Tensor = x + self.dropout(y)
        return out


class HSTUArgs(TypedDict, total=False):
    """``HSTU``'s arguments after ``num_items`` (what a model that extends it passes on)."""

    dim: int
    max_len: int
    num_blocks: int
    num_heads: int
    dropout: float
    temperature: float
    time_buckets: int


class HSTU(_SequenceEncoder):
    """An HSTU-style sequential transducer (Zhai et al., 2024) for generative retrieval.

    Pointwise SiLU attention replaces softmax attention; a learned bias by relative position, and
    by log-bucketed time gap where timestamps exist, is added to the attention scores; the output
    is L2-normalised and trained with sampled softmax at a low temperature.

    Args:
        num_items: catalogue size (ids 1..num_items, 0 = padding).
        dim: embedding width.
        max_len: longest input sequence.
        num_blocks: HSTU layers.
        num_heads: attention heads (must divide dim).
        dropout: dropout rate.
        temperature: softmax temperature (HSTU uses 0.05).
        time_buckets: log-scale buckets for time gaps (0 disables the time bias).
    """

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        max_len: int = 50,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        temperature: float = 0.05,
        time_buckets: int = 64,
    ) -> None:
        super().__init__(num_items, dim, max_len, dropout, "cosine", temperature)
        self.time_buckets = time_buckets
        self.blocks = nn.ModuleList(
            _HSTUBlock(dim, num_heads, max_len, time_buckets, dropout) for _ in range(num_blocks)
        )

    def _time_buckets(self, timestamps: torch.Tensor | None) -> torch.Tensor | None:
        if timestamps is None or self.time_buckets == 0:
            return None
        gap = (timestamps[:, :, None] - timestamps[:, None, :]).abs().clamp(min=1.0)
        bucket = (gap.log() / math.log(2.0)).floor().long()
        return bucket.clamp(0, self.time_buckets)

    def encode_positions(self, batch: Batch) -> torch.Tensor:
        items = batch["items"]
        n = items.shape[1]
        x, mask = self._input(items)
        valid = items > 0
        causal = torch.ones(n, n, dtype=torch.bool, device=items.device).tril()
        causal = (causal[None] & valid[:, None, :]).unsqueeze(1).to(x.dtype)
        time_bucket = self._time_buckets(batch.get("timestamps"))
        for block in self.blocks:
            x = block(x, causal, time_bucket) * mask
        states: torch.Tensor = self.ln(x)
        return states
