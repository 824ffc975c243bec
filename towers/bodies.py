"""Tower bodies: embedded features in, one ``[B, H]`` vector out.

A body is chosen per tower by ``TowerConfig.type`` through :data:`TOWER_BODIES`, the one
map from :class:`~pipeline.config.model.TowerType` to a :class:`TowerBody` subclass. A
custom body is a subclass taking ``(encoder, cfg)`` plus one entry in that map.

Every body ends with an aggregation of per-feature vectors and the MLP of
``TowerConfig.mlp``. Sequences the body does not model itself are mean-pooled over their
real (non-pad) positions; the transformer and CNN bodies replace their sequence's vector
with what they compute from it.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import checks
from pipeline.config.model import (
    Activation,
    Aggregation,
    CNNConfig,
    FusionMode,
    MLPConfig,
    Norm,
    SequencePooling,
    TowerConfig,
    TowerType,
    TransformerConfig,
)
from towers.features import Aggregator, Encoded, FeatureEncoder, masked_mean

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.TANH: nn.Tanh,
    Activation.LEAKY_RELU: nn.LeakyReLU,
}


def _norm(kind: Norm, width: int) -> nn.Module:
    if kind is Norm.BATCH:
        return nn.BatchNorm1d(width)
    return nn.LayerNorm(width) if kind is Norm.LAYER else nn.Identity()


class DenseLayer(nn.Module):
    """Linear -> norm -> activation -> dropout, plus the input when widths match."""

    def __init__(self, in_dim: int, out_dim: int, cfg: MLPConfig):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(in_dim, out_dim), _norm(cfg.norm, out_dim),
                                   ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout))
        self.residual = cfg.residual and in_dim == out_dim

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, out_dim]."""
        y = self.block(x)
        return x + y if self.residual else y


class MLP(nn.Module):
    """Hidden layers of ``MLPConfig``; no hidden layers is the identity.

    With ``gradient_checkpointing`` each layer's activations are recomputed in backward
    (training only) instead of being kept, trading compute for memory.
    """

    def __init__(self, in_dim: int, cfg: MLPConfig):
        super().__init__()
        widths = [in_dim, *cfg.hidden]
        self.layers = nn.ModuleList(DenseLayer(a, b, cfg) for a, b in pairwise(widths))
        self.width = widths[-1]
        self.checkpointing = cfg.gradient_checkpointing

    def output_dim(self) -> int:
        """Width of the last hidden layer (the input width when there is none)."""
        return self.width

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, output_dim]."""
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


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


def pooled_vectors(encoded: Encoded) -> dict[str, Tensor]:
    """Every feature as one [B, E] vector: sequences mean-pooled over real positions."""
    out = dict(encoded.vectors)
    for name, x in encoded.sequences.items():
        out[name] = masked_mean(x, encoded.masks[name])
    return out


class TowerBody(nn.Module):
    """Base of every body: ``(encoder, cfg)`` in, ``forward(encoded) -> [B, output_dim()]``.

    The encoder is read for widths and names only; it is not kept as a submodule.
    """

    def __init__(self, encoder: FeatureEncoder, cfg: TowerConfig):
        super().__init__()
        self.where = encoder.where

    def output_dim(self) -> int:
        """Width H of the body's output."""
        raise NotImplementedError

    def forward(self, encoded: Encoded) -> Tensor:
        """Embedded features -> [B, H]."""
        raise NotImplementedError


class MLPBody(TowerBody):
    """Aggregated features (sequences mean-pooled) through the MLP."""

    def __init__(self, encoder: FeatureEncoder, cfg: TowerConfig):
        super().__init__(encoder, cfg)
        self.aggregate = Aggregator(cfg.aggregation, encoder.widths, encoder.id_name,
                                    cfg.aggregation_dim, self.where)
        self.mlp = MLP(self.aggregate.output_dim(), cfg.mlp)

    def output_dim(self) -> int:  # noqa: D102
        return self.mlp.output_dim()

    def forward(self, encoded: Encoded) -> Tensor:
        """Embedded features -> [B, H]."""
        return self.mlp(self.aggregate(pooled_vectors(encoded)))


class SequenceBody(TowerBody):
    """A body that models one history itself; its vector joins the other features.

    The sequence is the one :func:`~pipeline.config.checks.sequence_to_model` picks for
    ``cfg.type``; subclasses build the module that runs over it.
    """

    def __init__(self, encoder: FeatureEncoder, cfg: TowerConfig):
        super().__init__(encoder, cfg)
        sequence = checks.sequence_to_model(cfg, encoder.sequence_names, self.where)
        assert sequence is not None, f"{type(self).__name__} registered for type={cfg.type}"
        self.sequence = sequence
        module = encoder.inputs[self.sequence]
        self.sequence_encoder = self.sequence_module(module.output_dim(), module.length, cfg)
        widths = dict(encoder.widths)
        widths[self.sequence] = self.sequence_encoder.output_dim()
        self.aggregate = Aggregator(cfg.aggregation, widths, encoder.id_name,
                                    cfg.aggregation_dim, self.where)
        self.mlp = MLP(self.aggregate.output_dim(), cfg.mlp)

    def sequence_module(self, width: int, length: int, cfg: TowerConfig) -> nn.Module:
        """The module mapping ([B, L, width], [B, L] mask) -> [B, S] (has ``output_dim``)."""
        raise NotImplementedError

    def output_dim(self) -> int:  # noqa: D102
        return self.mlp.output_dim()

    def forward(self, encoded: Encoded) -> Tensor:
        """Embedded features -> [B, H]."""
        vectors = pooled_vectors(encoded)
        vectors[self.sequence] = self.sequence_encoder(encoded.sequences[self.sequence],
                                                     encoded.masks[self.sequence])
        return self.mlp(self.aggregate(vectors))

    def positions(self, encoded: Encoded, masked: Tensor | None = None) -> Tensor:
        """Every position's output (the sequence training mode): -> [B, L, H].

        Each position's state joins the other features (the same vector at every
        position) through the same aggregation and MLP as :meth:`forward`, so with
        ``pooling=last`` the last position's output equals :meth:`forward`'s (without a
        mask token; with one, forward appends it).

        Args:
            encoded: the embedded features.
            masked: [B, L] bool positions replaced by the mask token (mlm), or None.
        """
        h, _ = self.sequence_encoder.states(encoded.sequences[self.sequence],
                                            encoded.masks[self.sequence], masked)  # [B, L, S]
        length = h.shape[1]
        vectors = {n: v.unsqueeze(1).expand(-1, length, -1)
                   for n, v in pooled_vectors(encoded).items() if n != self.sequence}
        vectors[self.sequence] = h
        return self.mlp(self.aggregate(vectors))


class TransformerBody(SequenceBody):
    """Self-attention over the history, joined with the other features, then the MLP."""

    def sequence_module(self, width: int, length: int, cfg: TowerConfig) -> nn.Module:  # noqa: D102
        return SequenceTransformer(width, length, cfg.transformer)


class CNNBody(SequenceBody):
    """1-D convolutions over the history, joined with the other features, then the MLP."""

    def sequence_module(self, width: int, length: int, cfg: TowerConfig) -> nn.Module:  # noqa: D102
        return SequenceCNN(width, cfg.cnn, cfg.mlp.activation)


class FusionBody(TowerBody):
    """Sub-encoders per feature group, projected to ``fusion.dim`` and fused, then the MLP.

    Groups are fused by concatenation, by a learned query attending over the group vectors,
    or by a softmax gate computed from all of them. With ``sum_item_multiply`` the id
    feature multiplies the sum of every group rather than forming one of its own.
    """

    def __init__(self, encoder: FeatureEncoder, cfg: TowerConfig):
        super().__init__(encoder, cfg)
        fusion, widths, id_name = cfg.fusion, encoder.widths, encoder.id_name
        multiply = cfg.aggregation is Aggregation.SUM_ITEM_MULTIPLY
        checks.check_item_multiply(cfg.aggregation, list(widths), id_name, self.where)
        groups = {}
        for g, members in checks.fusion_groups(cfg, list(widths), self.where).items():
            if multiply and id_name is not None:
                members = [n for n in members if n != id_name]
                if not members:
                    continue  # the id multiplies the other groups instead
                members.append(id_name)
            agg = Aggregator(cfg.aggregation, {n: widths[n] for n in members}, id_name,
                             cfg.aggregation_dim, f"{self.where}.fusion.groups.{g}")
            groups[g] = nn.Sequential(agg, nn.Linear(agg.output_dim(), fusion.dim),
                                      ACTIVATIONS[cfg.mlp.activation]())
        self.groups = nn.ModuleDict(groups)
        self.mode, n = fusion.mode, len(groups)
        self.query = nn.Parameter(torch.randn(fusion.dim) / math.sqrt(fusion.dim)) \
            if self.mode is FusionMode.ATTENTION else None
        self.gate = nn.Linear(n * fusion.dim, n) if self.mode is FusionMode.GATING else None
        fused = n * fusion.dim if self.mode is FusionMode.CONCAT else fusion.dim
        self.mlp = MLP(fused, cfg.mlp)

    def output_dim(self) -> int:  # noqa: D102
        return self.mlp.output_dim()

    def forward(self, encoded: Encoded) -> Tensor:
        """Embedded features -> [B, H]."""
        vectors = pooled_vectors(encoded)
        parts = [group(vectors) for group in self.groups.values()]  # G x [B, dim]
        if self.mode is FusionMode.CONCAT:
            return self.mlp(torch.cat(parts, -1))
        stacked = torch.stack(parts, 1)  # [B, G, dim]
        if self.query is not None:
            weights = torch.softmax(stacked @ self.query / math.sqrt(stacked.shape[-1]), -1)
        else:
            weights = torch.softmax(self.gate(stacked.flatten(1)), -1)  # [B, G]
        return self.mlp((weights.unsqueeze(-1) * stacked).sum(1))


TOWER_BODIES: dict[TowerType, type[TowerBody]] = {
    TowerType.MLP: MLPBody,
    TowerType.TRANSFORMER: TransformerBody,
    TowerType.FUSION: FusionBody,
    TowerType.CNN: CNNBody,
}
