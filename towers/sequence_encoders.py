"""Sequence encoders of the tower bodies: a causal or bidirectional transformer, a CNN.

Each reads ``[B, L, D]`` embedded positions with their real-position mask; :mod:`towers.bodies`
wraps them as tower bodies.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config.model import (
    Activation,
    CNNConfig,
    SequencePooling,
    TransformerConfig,
)
from towers.features import masked_mean
from towers.layers import ACTIVATIONS


def attendable(mask: Tensor) -> Tensor:
    """The mask with the last position of an empty history counted as real.

    A user with no history would otherwise have nothing to attend to or pool (a NaN);
    the pre-padded last position is then a zero embedding plus its position.

    Args:
        mask: [B, L] bool, True at real positions.

    Returns:
        [B, L] bool with at least one True per row.
    """
    last = torch.arange(mask.shape[1], device=mask.device) == mask.shape[1] - 1  # [L]
    return mask | (~mask.any(1, keepdim=True) & last)


class SequencePool(nn.Module):
    """Pools ``[B, L, D]`` states to ``[B, D]``: last, mean, learned attention or max."""

    def __init__(self, dim: int, mode: SequencePooling):
        super().__init__()
        self.mode = mode
        self.score = nn.Linear(dim, 1) if mode is SequencePooling.ATTENTION else None

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """Pool h [B, L, D] under mask [B, L] (from :func:`attendable`) -> [B, D]."""
        if self.mode is SequencePooling.LAST:
            return h[:, -1]  # pre-padded: the most recent item is last
        if self.mode is SequencePooling.MEAN:
            return masked_mean(h, mask)
        if self.mode is SequencePooling.MAX:
            return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # [B, L]
        return (torch.softmax(scores, -1).unsqueeze(-1) * h).sum(1)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with a mask drawn by ``rand_like`` (``nn.Dropout``'s distribution).

    On CPU, ``torch.rand_like`` plus a compare costs about half of the ``bernoulli_`` that
    ``nn.Dropout`` draws its mask with (1.3 against 2.3 ms for a [32, 50, 64] tensor, one
    thread): the 4 dropouts of a 2-block transformer were 9 % of an ML-100K training step.
    """
    if not training or p == 0.0:
        return x
    return x * ((torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p)))


class SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block (nanoGPT's layout) with a boolean attention mask."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.num_heads
        self.p = cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, cfg.ff_multiplier * d), nn.GELU(),
                                nn.Linear(cfg.ff_multiplier * d, d))
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, allowed: Tensor, last_only: bool = False) -> Tensor:
        """Attend: x [B, L, D], allowed [B, 1, L, L] (query, key) -> [B, L, D].

        With ``last_only`` only the last position queries (keys and values are still every
        position): -> [B, 1, D], the last row of the full output, for a fraction of its cost.
        """
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(d, dim=2))  # [B, H, L, D/H] each
        if last_only:
            q, x, allowed = q[:, :, -1:], x[:, -1:], allowed[:, :, -1:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.p if self.training else 0.0)
        x = x + dropout(self.proj(y.transpose(1, 2).reshape(b, x.shape[1], d)), self.dropout,
                        self.training)
        return x + dropout(self.ff(self.ln2(x)), self.dropout, self.training)


class SequenceTransformer(nn.Module):
    """Self-attention over a history: input projection, learned positions, blocks, pooling.

    Real positions attend to real positions (earlier ones only when causal); every
    position may attend to itself, so no query row is fully masked. With a mask token
    (:meth:`add_mask_token`, the mlm objective) training replaces the masked positions'
    inputs by it, and inference appends it after the most recent item (the oldest one
    drops out of the window) so that the last position predicts what comes next.
    """

    def __init__(self, width: int, length: int, cfg: TransformerConfig):
        super().__init__()
        self.input = nn.Linear(width, cfg.dim)
        self.position = nn.Parameter(torch.randn(length, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.pool = SequencePool(cfg.dim, cfg.pooling)
        self.causal, self.width, self.input_dropout = cfg.causal, cfg.dim, cfg.input_dropout
        self.mask_token: nn.Parameter | None = None

    def add_mask_token(self) -> None:
        """Learn a mask token of the input width (the mlm objective)."""
        self.mask_token = nn.Parameter(torch.randn(self.input.in_features) * 0.02)

    def output_dim(self) -> int:
        """The transformer width ``dim``."""
        return self.width

    def states(self, x: Tensor, mask: Tensor, masked: Tensor | None = None,
               last_only: bool = False) -> tuple[Tensor, Tensor]:
        """Every position's state.

        Args:
            x: [B, L', E] embedded history, L' <= L: the most recent L' positions of the
                window (the learned positions are the last L').
            mask: [B, L'] bool, True at real positions.
            masked: [B, L'] bool, True where the input is replaced by the mask token
                (training with the mlm objective), or None.
            last_only: the last block computes the last position only (``pooling=last``).

        Returns:
            [B, L', dim] states ([B, 1, dim] with ``last_only``) and the [B, L'] mask of
            positions that count as real.
        """
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), self.mask_token.to(x.dtype), x)
            mask = mask | masked
        mask = attendable(mask)
        n = x.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        allowed = mask[:, None, None, :]  # [B, 1, 1, L'] keys
        if self.causal:
            allowed = allowed & torch.ones_like(eye).tril()
        allowed = allowed | eye  # [B, 1, L', L']
        h = dropout(self.input(x) + self.position[self.position.shape[0] - n:],
                    self.input_dropout, self.training)
        for i, block in enumerate(self.blocks):
            h = block(h, allowed, last_only and i == len(self.blocks) - 1)
        return self.norm(h), mask

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode a history: x [B, L, E], mask [B, L] -> [B, dim].

        Leading positions that are padding in every row are cut first, outside
        ``torch.export`` / ``torch.compile`` (histories are pre-padded and a real position
        never attends to padding, so the result is the same); with ``pooling=last`` the
        last block computes the last position only.
        """
        if self.mask_token is not None:  # predict the next item from a mask after the last
            token = self.mask_token.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, E]
            x = torch.cat([x[:, 1:], token], 1)
            mask = torch.cat([mask[:, 1:], torch.ones_like(mask[:, :1])], 1)
        if not torch.compiler.is_compiling():  # an exported program keeps static shapes
            real = attendable(mask).any(0)  # [L] columns holding a real position of a row
            start = int(real.float().argmax())  # the first such column (the last always is)
            x, mask = x[:, start:], mask[:, start:]
        last = self.pool.mode is SequencePooling.LAST
        h, mask = self.states(x, mask, last_only=last)
        return h[:, -1] if last else self.pool(h, mask)


class SequenceCNN(nn.Module):
    """1-D convolutions along the history, then pooling.

    Convolutions are causal (left-padded, length kept): position t sees items t - k + 1 .. t,
    so ``last`` pooling summarises the most recent items. Pad positions are zeroed.
    """

    def __init__(self, width: int, cfg: CNNConfig, activation: Activation):
        super().__init__()
        chans = [width, *cfg.channels]
        self.left = cfg.kernel_size - 1
        self.convs = nn.ModuleList(nn.Conv1d(a, b, cfg.kernel_size)
                                   for a, b in pairwise(chans))
        self.act = ACTIVATIONS[activation]()
        self.pool = SequencePool(chans[-1], cfg.pooling)
        self.width = chans[-1]

    def output_dim(self) -> int:
        """Channels of the last convolution (the input width when there is none)."""
        return self.width

    def states(self, x: Tensor, mask: Tensor, masked: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """Every position's state: x [B, L, E], mask [B, L] -> ([B, L, C], [B, L] mask).

        ``masked`` must be None: a causal convolution has no mask token.
        """
        if masked is not None:
            raise ValueError("a CNN body looks back only and has no mask token (objective mlm)")
        mask = attendable(mask)
        keep = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
        h = x * keep
        for conv in self.convs:
            h = self.act(conv(F.pad(h.transpose(1, 2), (self.left, 0)))).transpose(1, 2) * keep
        return h, mask

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode a history: x [B, L, E], mask [B, L] -> [B, C]."""
        return self.pool(*self.states(x, mask))
