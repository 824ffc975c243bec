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

import torch
from torch import Tensor, nn

from pipeline.config.model import (
    Aggregation,
    FusionMode,
    TowerConfig,
    TowerType,
)
from towers.features import Aggregator, Encoded, FeatureEncoder, masked_mean
from towers.layers import ACTIVATIONS, MLP
from towers.sequence_encoders import (
    SequenceCNN,
    SequenceTransformer,
)


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

    The sequence is the tower plan's (``plan.sequence``, resolved by config validation);
    subclasses build the module that runs over it.
    """

    def __init__(self, encoder: FeatureEncoder, cfg: TowerConfig):
        super().__init__(encoder, cfg)
        self.sequence = encoder.plan.sequence
        assert self.sequence is not None, f"{type(self).__name__}: the plan names no sequence"
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
        groups = {}
        for g, members in encoder.plan.fusion_groups.items():
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
