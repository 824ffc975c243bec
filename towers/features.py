"""Feature encoders: one small module per input form, then one aggregation per tower.

A feature's kind names its input form (``pipeline.features``); :data:`FORM_MODULES` maps
each form to the module that embeds it, so a new kind that reuses a form needs no change
here.

Every module reads its own keys from the tower's batch ``features: dict[str, Tensor]``
(the prepared column name without its ``user__`` / ``item__`` prefix), reports
``output_dim()`` and ``input_spec()``, and takes every table size from the fitted
:class:`~pipeline.state.FeatureState`; nothing is typed twice in the model config.

Index 0 is padding / null in every id input (``padding_idx=0``: its row stays zero and
learns nothing), 1 is out-of-vocabulary and trains like any other row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.columns import MISSING, input_key
from pipeline.config.model import Aggregation, TowerConfig
from pipeline.config.plan import TowerPlan
from pipeline.features import InputForm, NumericTransform, Pooling, spec_of
from pipeline.state import FeatureState, TowerState
from pipeline.transforms import PAD

Spec = dict[str, tuple[str, tuple[int, ...]]]  # input key -> (dtype, shape after the batch dim)


def embedding_table(rows: int, dim: int) -> nn.Embedding:
    """An id table whose row 0 (padding / null) is zero and gets no update."""
    return nn.Embedding(rows, dim, padding_idx=PAD)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the positions where ``mask`` is set; zeros for a row with none.

    Args:
        x: [B, L, E] values.
        mask: [B, L] bool, True at real (non-pad) positions.

    Returns:
        [B, E].
    """
    m = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class FeatureModule(nn.Module):
    """One tower input -> its embedding; subclasses read their own keys from the batch."""

    is_sequence = False  # True: forward gives [B, L, E] and ``mask`` gives [B, L]

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    @classmethod
    def from_state(cls, name: str, state: FeatureState, cfg: TowerConfig,
                   item_states: Mapping[str, FeatureState],
                   shared: Mapping[str, nn.Embedding]) -> FeatureModule:
        """The module of one fitted feature; subclasses pick what they need.

        Args:
            name: the feature name (its batch key).
            state: its fitted state.
            cfg: the tower's model config (projection widths).
            item_states: the item tower's fitted features (a history's item features).
            shared: item feature name -> the item tower's table to reuse.
        """
        return cls(name, state)

    def output_dim(self) -> int:
        """Width E of the embedding."""
        raise NotImplementedError

    def input_spec(self) -> Spec:
        """The batch keys this module reads: ``{key: (dtype, shape tail)}``."""
        raise NotImplementedError


class CategoricalEmbedding(FeatureModule):
    """A single id per row: ``[B]`` int64 -> ``[B, E]``."""

    def __init__(self, name: str, state: FeatureState):
        super().__init__(name)
        self.table = embedding_table(state.num_embeddings, state.embedding_dim)

    def output_dim(self) -> int:  # noqa: D102
        return self.table.embedding_dim

    def input_spec(self) -> Spec:  # noqa: D102
        return {self.name: ("int64", ())}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B] ids -> [B, E]."""
        return self.table(features[self.name])


class BagEmbedding(FeatureModule):
    """Multi-hot or text: ``[B, L]`` post-padded ids -> mean or sum of their rows ``[B, E]``."""

    def __init__(self, name: str, state: FeatureState):
        super().__init__(name)
        self.table = embedding_table(state.num_embeddings, state.embedding_dim)
        self.length = state.max_length
        self.mean = state.pooling is not Pooling.SUM

    def output_dim(self) -> int:  # noqa: D102
        return self.table.embedding_dim

    def input_spec(self) -> Spec:  # noqa: D102
        return {self.name: ("int64", (self.length,))}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, L] ids (0 = pad) -> [B, E]; an empty bag gives zeros."""
        ids = features[self.name]
        if self.mean:
            return masked_mean(self.table(ids), ids != PAD)
        return (self.table(ids) * (ids != PAD).unsqueeze(-1)).sum(1)


class NumericInput(FeatureModule):
    """A scalar (+ its null flag) as-is or projected; a bucket id through an embedding."""

    def __init__(self, name: str, state: FeatureState, projection_dim: int | None):
        super().__init__(name)
        self.missing = state.missing_indicator
        bucketized = state.transform is NumericTransform.BUCKETIZE
        self.table = (embedding_table(state.num_embeddings, state.embedding_dim)
                      if bucketized else None)
        width = (state.embedding_dim if bucketized else 1) + int(self.missing)
        self.project = (nn.Linear(width, projection_dim)
                        if projection_dim is not None and not bucketized else None)
        self.width = projection_dim if self.project is not None else width

    @classmethod
    def from_state(cls, name, state, cfg, item_states, shared) -> NumericInput:  # noqa: D102
        return cls(name, state, cfg.numeric_projection_dim)

    def output_dim(self) -> int:  # noqa: D102
        return self.width

    def input_spec(self) -> Spec:  # noqa: D102
        spec = {self.name: ("int64" if self.table is not None else "float32", ())}
        if self.missing:
            spec[input_key(self.name, MISSING)] = ("float32", ())
        return spec

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B] value or bucket id (+ [B] null flag) -> [B, E]."""
        value = features[self.name]
        x = self.table(value) if self.table is not None else value.unsqueeze(-1).float()
        if self.missing:
            flag = features[input_key(self.name, MISSING)].unsqueeze(-1)  # [B, 1]
            x = torch.cat([x, flag.to(x.dtype)], -1)
        return self.project(x) if self.project is not None else x


class DenseProjection(FeatureModule):
    """A pretrained vector ``[B, dim]`` -> Linear -> ``[B, dense_projection_dim]``."""

    def __init__(self, name: str, state: FeatureState, projection_dim: int):
        super().__init__(name)
        self.project = nn.Linear(state.dim, projection_dim)

    @classmethod
    def from_state(cls, name, state, cfg, item_states, shared) -> DenseProjection:  # noqa: D102
        return cls(name, state, cfg.dense_projection_dim)

    def output_dim(self) -> int:  # noqa: D102
        return self.project.out_features

    def input_spec(self) -> Spec:  # noqa: D102
        return {self.name: ("float32", (self.project.in_features,))}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, dim] -> [B, E]."""
        return self.project(features[self.name])


class SequenceEmbedding(FeatureModule):
    """History item ids and their item features, embedded per position.

    ``shared`` maps item-tower feature names to the item tower's own tables; a name found
    there is reused (the same ``nn.Embedding``), any other gets a table of its own sized
    from the item tower's fitted state.
    """

    is_sequence = True

    def __init__(self, name: str, state: FeatureState, item_states: Mapping[str, FeatureState],
                 shared: Mapping[str, nn.Embedding]):
        super().__init__(name)
        self.length = state.max_length
        tied = shared.get(state.vocab_of) if state.vocab_of else None
        self.id_table = tied if tied is not None else embedding_table(
            state.num_embeddings, state.embedding_dim)
        tables = {}
        for f in state.item_features:
            if f not in item_states:
                raise ValueError(f"sequence {name!r}: item feature {f!r} is not a fitted item "
                                 f"feature; accepted: {sorted(item_states)}")
            st = item_states[f]
            tables[f] = shared[f] if f in shared else embedding_table(
                st.num_embeddings, st.embedding_dim)
        self.item_tables = nn.ModuleDict(tables)

    @classmethod
    def from_state(cls, name, state, cfg, item_states, shared) -> SequenceEmbedding:  # noqa: D102
        return cls(name, state, item_states, shared)

    def output_dim(self) -> int:  # noqa: D102
        return self.id_table.embedding_dim + sum(t.embedding_dim
                                                 for t in self.item_tables.values())

    def input_spec(self) -> Spec:  # noqa: D102
        spec = {self.name: ("int64", (self.length,))}
        spec.update({input_key(self.name, f): ("int64", (self.length,)) for f in self.item_tables})
        return spec

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """[B, L] ids (+ [B, L] per item feature) -> [B, L, E] (id and features concatenated)."""
        parts = [self.id_table(features[self.name])]
        parts += [t(features[input_key(self.name, f)]) for f, t in self.item_tables.items()]
        return torch.cat(parts, -1)

    def mask(self, features: dict[str, Tensor]) -> Tensor:
        """[B, L] bool, True at real history positions."""
        return features[self.name] != PAD


FORM_MODULES: dict[InputForm, type[FeatureModule]] = {
    InputForm.ID: CategoricalEmbedding,
    InputForm.BAG: BagEmbedding,
    InputForm.VALUE: NumericInput,
    InputForm.VECTOR: DenseProjection,
    InputForm.SEQUENCE: SequenceEmbedding,
}


def build_feature(name: str, state: FeatureState, cfg: TowerConfig,
                  item_states: Mapping[str, FeatureState],
                  shared: Mapping[str, nn.Embedding]) -> FeatureModule:
    """The module for one fitted feature, chosen by its kind's input form.

    Raises:
        ValueError: the kind is not registered, or no module takes its form.
    """
    form = spec_of(state.type).form
    if form not in FORM_MODULES:
        raise ValueError(f"feature {name!r}: input form {form.value!r} of type "
                         f"{state.type.value!r} has no encoder; accepted: "
                         f"{[f.value for f in FORM_MODULES]}")
    return FORM_MODULES[form].from_state(name, state, cfg, item_states, shared)


class VariationalDropout(nn.Module):
    """Learned dropout probability per feature (TorchEasyRec's ``VariationalDropout``).

    In training each row keeps or drops a whole feature with a concrete (relaxed
    Bernoulli) mask, so the probability gets a gradient; at eval it is the identity. As in
    TorchEasyRec the kept values are not rescaled. :meth:`penalty` is ``sum(1 - p)``:
    weighted into the loss it pushes uninformative features towards being dropped.
    """

    def __init__(self, names: list[str], initial_p: float = 0.1, temperature: float = 0.1):
        super().__init__()
        self.index = {n: i for i, n in enumerate(names)}
        logit = torch.log(torch.tensor(initial_p / (1 - initial_p)))
        self.logits = nn.Parameter(logit.repeat(len(names)))
        self.temperature = temperature

    def probabilities(self) -> Tensor:
        """[F] dropout probability of each feature."""
        return torch.sigmoid(self.logits)

    def penalty(self) -> Tensor:
        """Scalar ``sum(1 - p)``."""
        return (1 - self.probabilities()).sum()

    def forward(self, name: str, x: Tensor) -> Tensor:
        """Mask one feature: x [B, ...] -> [B, ...] (identity at eval)."""
        if not self.training:
            return x
        eps = 1e-7
        u = torch.rand(x.shape[0], device=x.device, dtype=x.dtype)  # [B]
        noise = torch.log(u + eps) - torch.log(1 - u + eps)
        drop = torch.sigmoid((self.logits[self.index[name]] + noise) / self.temperature)
        return x * (1 - drop).view(-1, *([1] * (x.dim() - 1)))


class Encoded(NamedTuple):
    """What a tower's encoder gives its body."""

    vectors: dict[str, Tensor]  # name -> [B, E], non-sequence features
    sequences: dict[str, Tensor]  # name -> [B, L, E]
    masks: dict[str, Tensor]  # name -> [B, L] bool, True at real positions


class FeatureEncoder(nn.Module):
    """The embedding group of one tower: every selected feature, each through its module.

    Args:
        state: the tower's fitted features.
        cfg: the tower's model config (projections, variational dropout).
        plan: the tower as config validation resolved it: the features it uses and its id
            feature (the multiplier of ``aggregation=sum_item_multiply``).
        where: config path used in error messages, e.g. ``"model.user"``.
        item_states: the item tower's fitted features (sizes of history item features).
        shared: sequence name -> {item feature name: the item tower's table to reuse}.
    """

    def __init__(self, state: TowerState, cfg: TowerConfig, plan: TowerPlan, where: str,
                 item_states: Mapping[str, FeatureState] | None = None,
                 shared: Mapping[str, Mapping[str, nn.Embedding]] | None = None):
        super().__init__()
        self.where = where
        self.plan = plan
        names = plan.features
        shared = shared or {}
        self.inputs = nn.ModuleDict({
            n: build_feature(n, state.features[n], cfg, item_states or {}, shared.get(n, {}))
            for n in names})
        self.dropout = VariationalDropout(names) if cfg.variational_dropout else None
        self.id_name = plan.id_feature

    @property
    def widths(self) -> dict[str, int]:
        """Feature name -> embedding width E, in input order."""
        return {n: m.output_dim() for n, m in self.inputs.items()}

    @property
    def sequence_names(self) -> list[str]:
        """Names of the sequence features."""
        return [n for n, m in self.inputs.items() if m.is_sequence]

    def table(self, name: str) -> nn.Embedding | None:
        """The embedding table of a categorical feature (None if absent or not categorical)."""
        module = self.inputs[name] if name in self.inputs else None
        return module.table if isinstance(module, CategoricalEmbedding) else None

    def input_spec(self) -> Spec:
        """Every batch key the tower reads: ``{key: (dtype, shape tail)}``."""
        spec: Spec = {}
        for module in self.inputs.values():
            spec.update(module.input_spec())
        return spec

    def regularization_loss(self) -> Tensor:
        """The variational dropout penalty (scalar; 0 when off)."""
        if self.dropout is None:
            return torch.zeros(())
        return self.dropout.penalty()

    def forward(self, features: dict[str, Tensor]) -> Encoded:
        """Embed every selected feature of a [B]-row batch."""
        vectors, sequences, masks = {}, {}, {}
        for name, module in self.inputs.items():
            x = module(features)
            if self.dropout is not None:
                x = self.dropout(name, x)
            if module.is_sequence:
                sequences[name], masks[name] = x, module.mask(features)
            else:
                vectors[name] = x
        return Encoded(vectors, sequences, masks)


class Aggregator(nn.Module):
    """Combines feature vectors into one (Transformers4Rec's three modes, plus gating).

    ``concat`` joins them; ``sum`` projects each vector whose width is not ``dim`` (default:
    the largest width) and adds them; ``sum_item_multiply`` adds the others the same way
    and multiplies the sum element-wise by the (projected) id feature's embedding;
    ``gating`` projects them the same way and adds them weighted by a softmax gate that a
    linear layer computes from all of them (per row, or per position of a sequence).
    Vectors may carry extra leading dims (``[B, L, E]``): every mode works on the last.

    Args:
        mode: the aggregation.
        widths: feature name -> width E of its [B, E] vector.
        id_name: the id feature (the multiplier of ``sum_item_multiply``; config
            validation made sure it is among ``widths`` with a feature besides it).
        dim: the common width of the sum modes.
        where: config path used in error messages.
    """

    def __init__(self, mode: Aggregation, widths: Mapping[str, int], id_name: str | None,
                 dim: int | None, where: str):
        super().__init__()
        if not widths:
            raise ValueError(f"{where}: no features to aggregate")
        self.mode, self.names = mode, list(widths)
        self.id_name = id_name if mode is Aggregation.SUM_ITEM_MULTIPLY else None
        self.width = sum(widths.values()) if mode is Aggregation.CONCAT else (
            dim or max(widths.values()))
        self.project = nn.ModuleDict({} if mode is Aggregation.CONCAT else {
            n: nn.Linear(w, self.width) for n, w in widths.items() if w != self.width})
        self.gate = (nn.Linear(len(widths) * self.width, len(widths))
                     if mode is Aggregation.GATING else None)

    def output_dim(self) -> int:
        """Width of the aggregated vector."""
        return self.width

    def forward(self, vectors: dict[str, Tensor]) -> Tensor:
        """{name: [..., E_name]} -> [..., output_dim]."""
        if self.mode is Aggregation.CONCAT:
            return torch.cat([vectors[n] for n in self.names], -1)
        xs = {n: self.project[n](vectors[n]) if n in self.project else vectors[n]
              for n in self.names}
        if self.gate is not None:
            stacked = torch.stack(list(xs.values()), -2)  # [..., F, W]
            weights = torch.softmax(self.gate(stacked.flatten(-2)), -1)  # [..., F]
            return (weights.unsqueeze(-1) * stacked).sum(-2)
        if self.id_name is None:
            return torch.stack(list(xs.values())).sum(0)
        others = torch.stack([x for n, x in xs.items() if n != self.id_name]).sum(0)
        return others * xs[self.id_name]
