"""Builders of fitted feature states and random tower batches for the tower tests.

No data files: states are made directly with the sizes a prepare run would fit (rows =
vocabulary + 2 reserved rows), batches follow the input contract of ``towers``.
"""

from __future__ import annotations

import torch

from pipeline.config.model import ModelConfig, TowerConfig
from pipeline.config.plan import plan_for_state
from pipeline.config.sequence import SequenceConfig
from pipeline.state import FeatureState, FeatureStateSet, TowerState
from towers.model import TwoTowerModel, build_two_tower

ITEM_ROWS = 12  # item-id vocabulary of 10 + pad + OOV


def categorical(rows: int = 7, dim: int = 4, source: str = "") -> FeatureState:
    return FeatureState(type="categorical", source=source, num_embeddings=rows,
                        embedding_dim=dim, vocab=list(range(rows - 2)), vocab_type="int64")


def bag(kind: str = "multi_hot", rows: int = 6, dim: int = 4, length: int = 3,
        pooling: str = "mean") -> FeatureState:
    return FeatureState(type=kind, source=kind, num_embeddings=rows, embedding_dim=dim,
                        max_length=length, pooling=pooling)


def numeric(transform: str = "standardize", missing: bool = True, buckets: int = 3,
            dim: int = 3) -> FeatureState:
    if transform == "bucketize":
        return FeatureState(type="numeric", source="x", transform=transform,
                            boundaries=[float(b) for b in range(buckets - 1)],
                            num_embeddings=buckets + 1, embedding_dim=dim,
                            missing_indicator=missing)
    return FeatureState(type="numeric", source="x", transform=transform,
                        missing_indicator=missing)


def dense(dim: int = 5) -> FeatureState:
    return FeatureState(type="dense_vector", source="v", dim=dim)


def sequence(dim: int = 4, length: int = 5, item_features: tuple[str, ...] = (),
             vocab_of: str | None = "item_id", rows: int = ITEM_ROWS) -> FeatureState:
    return FeatureState(type="sequence", source="history", num_embeddings=rows,
                        embedding_dim=dim, max_length=length,
                        item_features=list(item_features), vocab_of=vocab_of)


def state_set(user: dict[str, FeatureState], item: dict[str, FeatureState]) -> FeatureStateSet:
    """A fitted state; the id features are the ones read from ``user_id`` / ``item_id``."""
    def keyed(feats, key):
        return {n: FeatureState(**{**s.__dict__, "source": key}) if n == key else s
                for n, s in feats.items()}
    return FeatureStateSet(user=TowerState(keyed(user, "user_id")),
                           item=TowerState(keyed(item, "item_id")),
                           user_id="user_id", item_id="item_id")


def demo_state(seq_dim: int = 8, item_dim: int = 8) -> FeatureStateSet:
    """Every feature type, like configs/demo.yaml (small)."""
    return state_set(
        user={"user_id": categorical(9, 6), "age": numeric("bucketize"),
              "signup_days": numeric("log", missing=True),
              "history": sequence(seq_dim, 5, ("category",))},
        item={"item_id": categorical(ITEM_ROWS, item_dim), "category": categorical(5, 3),
              "tags": bag("multi_hot"), "title": bag("text", pooling="sum"),
              "price": numeric("log"), "embedding": dense(5)})


def model_config(**kw) -> ModelConfig:
    """A ModelConfig; ``user`` / ``item`` may be given as dicts of TowerConfig fields."""
    for side in ("user", "item"):
        if isinstance(kw.get(side), dict):
            kw[side] = TowerConfig(**kw[side])
    return ModelConfig(**kw)


def build(model: ModelConfig, fitted: FeatureStateSet,
          sequence: SequenceConfig | None = None) -> TwoTowerModel:
    """The two towers of ``model`` over ``fitted``, resolved as config validation would."""
    return build_two_tower(model, fitted, plan_for_state(model, fitted, sequence))


def _ids(g: torch.Generator, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(1, rows, shape, generator=g)


def batch_for(tower: str, fitted: FeatureStateSet, batch: int, seed: int = 0,
              names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A random batch for one tower: bags post-padded, histories pre-padded (row 0 empty)."""
    g = torch.Generator().manual_seed(seed)
    state = getattr(fitted, tower)
    out: dict[str, torch.Tensor] = {}
    for name, st in state.features.items():
        if names is not None and name not in names:
            continue
        if st.type == "categorical":
            out[name] = torch.randint(0, st.num_embeddings, (batch,), generator=g)
        elif st.type in ("multi_hot", "text", "sequence"):
            ids = _ids(g, st.num_embeddings, (batch, st.max_length))
            lengths = torch.randint(0, st.max_length + 1, (batch,), generator=g)
            lengths[0] = 0
            pos = torch.arange(st.max_length)
            keep = (pos >= st.max_length - lengths[:, None]) if st.type == "sequence" \
                else (pos < lengths[:, None])
            out[name] = ids * keep
            for f in st.item_features:
                rows = fitted.item.features[f].num_embeddings
                out[f"{name}__{f}"] = _ids(g, rows, (batch, st.max_length)) * keep
        elif st.type == "numeric" and st.transform == "bucketize":
            out[name] = _ids(g, st.num_embeddings, (batch,))
        elif st.type == "numeric":
            out[name] = torch.randn(batch, generator=g)
        else:
            out[name] = torch.randn(batch, st.dim, generator=g)
        if st.missing_indicator:
            out[f"{name}__missing"] = torch.randint(0, 2, (batch,), generator=g).float()
    return out
