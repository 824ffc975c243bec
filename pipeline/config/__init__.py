"""Typed experiment config: one YAML file per experiment, validated at the edge.

One module per section, each a strict pydantic model: ``data`` and ``prepare``
(:mod:`~pipeline.config.data`: where the three Parquet tables are, their key columns, how
the split is made), ``features`` (:mod:`~pipeline.config.features`: one typed entry per
tower input), ``model``, ``loss``, ``train``, ``index`` and ``serve``. :class:`Config` holds
them all and cross-checks the model against the features; ``sequence``
(:mod:`~pipeline.config.sequence`) turns on training at every position of each sequence.
Every model forbids unknown keys, so a typo is an error that names the key;
``tests/test_config_keys.py`` checks that code reads every key.

Overrides use dotted paths, e.g. ``--set data.root=/data/ml100k``, ``--set
features.user.0.min_count=5``, and are applied to the raw mapping before validation.
"""

from __future__ import annotations

import os
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from pipeline.config import checks
from pipeline.config.data import DataConfig, Duplicates, PrepareConfig
from pipeline.config.features import (
    CategoricalFeature,
    DenseVectorFeature,
    Feature,
    FeaturesConfig,
    MultiHotFeature,
    NullFill,
    NumericFeature,
    NumericTransform,
    Pooling,
    SequenceFeature,
    TextFeature,
)
from pipeline.config.index import IndexConfig
from pipeline.config.loss import LossConfig
from pipeline.config.model import IdInit, ModelConfig, TowerConfig
from pipeline.config.plan import ModelPlan, infos, resolve_plan
from pipeline.config.sequence import Candidates, Objective, SequenceConfig
from pipeline.config.serve import ServeConfig
from pipeline.config.train import TrainConfig
from pipeline.config.tune import TuneConfig
from pipeline.features.base import REGISTRY, FeatureConfig
from pipeline.strict import StrictModel

__all__ = [
    "Candidates", "CategoricalFeature", "Config", "DataConfig", "DenseVectorFeature",
    "Duplicates", "Feature",
    "FeaturesConfig", "IndexConfig", "LossConfig", "ModelConfig", "MultiHotFeature",
    "NullFill", "NumericFeature", "NumericTransform", "Pooling", "PrepareConfig",
    "Objective", "SequenceConfig", "SequenceFeature", "ServeConfig", "StrictModel",
    "TextFeature", "TowerConfig", "TrainConfig", "TuneConfig", "apply_overrides",
    "load_config", "parse_config",
]


class Config(StrictModel):
    """A whole experiment config. Sections added by later packages live here too."""

    data: DataConfig = Field(description="Where the three Parquet tables are, their keys.")
    features: FeaturesConfig = Field(description="The inputs of each tower.")
    prepare: PrepareConfig = Field(default_factory=PrepareConfig,
                                   description="How the prepare job splits and writes.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The two towers.")
    loss: LossConfig = Field(default_factory=LossConfig,
                             description="The training loss and its negatives.")
    sequence: SequenceConfig = Field(default_factory=SequenceConfig,
                                     description="The sequence training mode (off: no objective).")
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="The optimiser, epochs, Ray Train scaling.")
    index: IndexConfig = Field(default_factory=IndexConfig,
                               description="The FAISS index and the embedding batch job.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The endpoint.")
    tune: TuneConfig = Field(default_factory=TuneConfig,
                             description="The search of jobs.tune (ignored by the other jobs).")
    _plan: ModelPlan = PrivateAttr()

    @model_validator(mode="after")
    def _model_matches_features(self) -> Config:
        user = {f.name: f for f in self.features.user}
        item = {f.name: f for f in self.features.item}
        plan = resolve_plan(self.model, self.sequence, infos(user), infos(item),
                            self.data.user_id, self.data.item_id)
        on_ids = []  # the settings that act on the item id table
        if self.model.item_id_init is IdInit.SVD:
            on_ids.append("model.item_id_init=svd")
        if self.model.item_id_lr_scale != 1.0:
            on_ids.append(f"model.item_id_lr_scale={self.model.item_id_lr_scale}")
        if on_ids and plan.item.id_feature is None:
            raise ValueError(f"{' and '.join(on_ids)} act on the item tower's id table, but "
                             "the item tower has no id feature (a categorical feature of "
                             f"data.item_id={self.data.item_id!r}); add one to features.item "
                             "or leave model.item_id_init=random and item_id_lr_scale=1")
        if plan.window is not None:
            checks.window_stride(self.sequence.window_stride, plan.window,
                                 user[plan.window].max_length)
        self._plan = plan
        if self.sequence.enabled and self.loss.impressions_column is not None:
            raise ValueError(f"loss.impressions_column={self.loss.impressions_column!r} gives "
                             "each interaction row its own negatives, which the sequence "
                             f"mode (sequence.objective={self.sequence.objective.value}) does "
                             "not train on; remove it or set sequence.objective to null")
        return self

    @model_validator(mode="after")
    def _tune_space_paths(self) -> Config:
        raw = self.model_dump(mode="json")
        for path in self.tune.space:
            try:
                _resolve(raw, path)
            except ValueError as err:
                raise ValueError(f"tune.space key {path!r}: {err}") from None
        return self

    @property
    def plan(self) -> ModelPlan:
        """The towers as validation resolved them (:mod:`~pipeline.config.plan`)."""
        return self._plan

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (enums as values), for artifacts."""
        return self.model_dump(mode="json")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping.

    List elements are addressed by index (``features.user.0.min_count=5``).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML "
                             f"({' '.join(str(err).split())})") from None
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        else:
            node[last] = value
    return raw


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override path {path!r}: {part!r} is not an index below {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ValueError(f"override path {path!r} goes through a value, not a section")
    if part not in node and create:
        node[part] = {}
    return node[part]


def _resolve(raw: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of a config mapping; an unknown step names what exists."""
    node: Any = raw
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, dict) and part not in node:
            raise ValueError(f"{where} has no field {part!r} (it has {sorted(node)})")
        node = _child(node, part, ".".join(parts[: i + 1]), create=False)
    return node


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides and validate it.

    Raises:
        ValueError: naming the file and every invalid key with what is accepted.
    """
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())}); accepted: "
                             "a YAML mapping of sections (data, features, ...)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw mapping; the one-line error names each key path and the problem.

    An unknown key's message lists the keys its section accepts.
    """
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                keys = _accepted_keys(e["loc"][:-1])
                msg += f" (accepted here: {', '.join(keys)})" if keys else ""
            problems.append(f"{loc or '<top>'}: {msg}")
        raise ValueError(f"{source}: invalid config: " + "; ".join(problems)) from None


def _accepted_keys(loc: tuple) -> list[str]:
    """The field names of the config model at ``loc`` (empty when it cannot be told)."""
    tp: Any = Config
    for part in loc:
        tp = _step(tp, part)
        if tp is None:
            return []
    model = _model_of(tp)
    return sorted(model.model_fields) if model else []


def _model_of(tp: Any) -> type[BaseModel] | None:
    """The pydantic model a field type stands for (Optional / Annotated unwrapped)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _step(tp: Any, part: Any) -> Any:
    """The type one ``loc`` part further down: a field, a list element, a feature's kind."""
    if isinstance(part, int) or get_origin(tp) is dict:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[-1] if args else None
    model = _model_of(tp)
    if model is None:
        return None
    if part in model.model_fields:
        return model.model_fields[part].annotation
    if issubclass(model, FeatureConfig):  # a feature entry: the loc names its kind
        spec = REGISTRY.get(part)
        return spec.config if spec else None
    return None
