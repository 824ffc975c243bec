"""The resolved plan of the two towers: what validation worked out, kept for the builders.

:class:`~pipeline.config.Config` validation resolves each tower once, with the rules of
:mod:`~pipeline.config.checks`, into a :class:`ModelPlan`: the features each tower uses, its
id feature, the sequence its body runs over, its fusion groups, which user histories share
the item tower's id table, and the sequence that training windows are cut from. Training
keeps the plan in the model's ``meta.json``; ``towers`` builds from it and never calls the
checks again, so a rule has one home and one message.

:func:`resolve_plan` works on plain feature descriptions (:class:`FeatureInfo`), so the
same resolution serves a config file (its feature configs) and a fitted feature state
(:func:`plan_for_state`, for a model built from a state without a whole config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import Field

from pipeline.config import checks
from pipeline.config.model import ModelConfig, TowerConfig, TowerType
from pipeline.config.sequence import Objective, SequenceConfig
from pipeline.features import InputForm, spec_of
from pipeline.strict import StrictModel

if TYPE_CHECKING:
    from pipeline.state import FeatureStateSet


class FeatureInfo(NamedTuple):
    """What the plan needs to know of one feature."""

    name: str
    type: str  # the feature kind's value
    source: str  # the column it is read from
    embedding_dim: int


class TowerPlan(StrictModel):
    """One tower, resolved."""

    features: list[str] = Field(description="The features the tower uses, in tower order.")
    id_feature: str | None = Field(
        description="The categorical feature read from the tower's key column (the "
                    "multiplier of aggregation=sum_item_multiply); None: none selected.")
    sequence: str | None = Field(
        description="The history a transformer / cnn body runs over (None: other bodies).")
    fusion_groups: dict[str, list[str]] | None = Field(
        description="type=fusion: group -> members, 'rest' holding the ungrouped features.")


class ModelPlan(StrictModel):
    """Both towers, resolved, and what joins them."""

    user: TowerPlan
    item: TowerPlan
    tied: list[str] = Field(
        description="User histories that reuse the item tower's id table (and item features).")
    window: str | None = Field(
        description="The user history cut into training windows (None: interaction mode).")
    mask_token: bool = Field(
        description="sequence.objective=mlm: the user transformer learns a mask token.")


def resolve_tower(where: str, cfg: TowerConfig, features: Sequence[FeatureInfo],
                  key_column: str) -> TowerPlan:
    """Resolve one tower: its selected features, id feature, body sequence, fusion groups.

    Raises:
        ValueError: naming ``where`` and the setting, for a tower its features cannot build.
    """
    by_name = {f.name: f for f in features}
    used = checks.selected_features(cfg, list(by_name), where)
    id_name = checks.id_feature(((n, by_name[n].type, by_name[n].source) for n in used),
                                key_column)
    sequence = checks.sequence_to_model(cfg, _sequences(used, by_name), where)
    groups = checks.fusion_groups(cfg, used, where) if cfg.type is TowerType.FUSION else None
    checks.check_item_multiply(cfg.aggregation, used, id_name, where)
    return TowerPlan(features=used, id_feature=id_name, sequence=sequence,
                     fusion_groups=groups)


def resolve_plan(model: ModelConfig, sequence: SequenceConfig,
                 user: Sequence[FeatureInfo], item: Sequence[FeatureInfo],
                 user_id: str, item_id: str) -> ModelPlan:
    """Resolve both towers and the sequence mode (every cross-check of the model section).

    Args:
        model: the ``model`` section.
        sequence: the ``sequence`` section.
        user: the user tower's features, in tower order.
        item: the item tower's features, in tower order.
        user_id: ``data.user_id``.
        item_id: ``data.item_id``.

    Raises:
        ValueError: naming the setting, why it cannot build, and the fix.
    """
    user_plan = resolve_tower("model.user", model.user, user, user_id)
    item_plan = resolve_tower("model.item", model.item, item, item_id)
    users, items = {f.name: f for f in user}, {f.name: f for f in item}
    item_key = item_plan.id_feature
    item_dim = items[item_key].embedding_dim if item_key is not None else None
    sequences = _sequences(user_plan.features, users)
    tied = [n for n in sequences
            if checks.tie_sequence(model.tie_sequence_embedding, n, users[n].embedding_dim,
                                   item_key, item_dim)]
    window = checks.sequence_mode(sequence.objective, sequence.feature, model.user, sequences)
    return ModelPlan(user=user_plan, item=item_plan, tied=tied, window=window,
                     mask_token=sequence.objective is Objective.MLM)


def _sequences(names: Sequence[str], by_name: Mapping[str, FeatureInfo]) -> list[str]:
    """The sequence features among ``names``, in order."""
    return [n for n in names if spec_of(by_name[n].type).form is InputForm.SEQUENCE]


def infos(features: Mapping[str, Any]) -> list[FeatureInfo]:
    """:class:`FeatureInfo` s of a tower's features (configs or fitted states), in order."""
    return [FeatureInfo(n, getattr(f.type, "value", f.type), f.source,
                        getattr(f, "embedding_dim", 0)) for n, f in features.items()]


def plan_for_state(model: ModelConfig, fitted: FeatureStateSet,
                   sequence: SequenceConfig | None = None) -> ModelPlan:
    """The plan of a model section over a fitted feature state (no whole config at hand).

    :attr:`Config.plan <pipeline.config.Config.plan>` is the same resolution over the
    config's features; the two agree, since prepare fits exactly the configured features.
    """
    return resolve_plan(model, sequence or SequenceConfig(), infos(fitted.user.features),
                        infos(fitted.item.features), fitted.user_id, fitted.item_id)
