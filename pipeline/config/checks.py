"""Cross-checks of a tower's model config against its features: each rule written once.

One caller holds every rule: :mod:`~pipeline.config.plan` resolves the towers with them,
from a config's features (:class:`~pipeline.config.Config` validation) or from a fitted
state (:func:`~pipeline.config.plan.plan_for_state`), so the same mistake gives the same
message at both edges. ``towers`` builds from the resolved plan and never calls these.
``where`` is the config path a message names, e.g. ``"model.user"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.config.model import Aggregation, Norm, SequencePooling, TowerConfig, TowerType
from pipeline.config.sequence import Objective
from pipeline.features import InputForm, spec_of

SEQUENCE_TYPES = (TowerType.TRANSFORMER, TowerType.CNN)  # bodies that run over one sequence


def id_features(features: Iterable[tuple[str, str, str]], key_column: str) -> list[str]:
    """The tower's id features: the categorical features read from its key column.

    Args:
        features: ``(name, type, source column)`` of each candidate feature, in tower order.
        key_column: the tower's key column (``data.user_id`` / ``data.item_id``).

    Returns:
        Their names, in tower order.
    """
    return [name for name, kind, source in features
            if spec_of(kind).form is InputForm.ID and source == key_column]


def id_feature(features: Iterable[tuple[str, str, str]], key_column: str) -> str | None:
    """The tower's id feature (the multiplier of ``sum_item_multiply``): the first one."""
    return next(iter(id_features(features, key_column)), None)


def selected_features(cfg: TowerConfig, names: Sequence[str], where: str) -> list[str]:
    """The tower's feature names in tower order, restricted to ``cfg.features``.

    Raises:
        ValueError: ``cfg.features`` names a feature the tower does not have.
    """
    if cfg.features is None:
        return list(names)
    unknown = [n for n in cfg.features if n not in names]
    if unknown:
        raise ValueError(f"{where}.features {unknown} are not features of this tower; "
                         f"accepted: {list(names)}")
    return [n for n in names if n in cfg.features]


def sequence_to_model(cfg: TowerConfig, sequences: Sequence[str], where: str) -> str | None:
    """The sequence feature a transformer / CNN body runs over (None for other bodies).

    Args:
        cfg: the tower config; ``cfg.transformer.sequence`` / ``cfg.cnn.sequence`` may name it.
        sequences: the tower's selected sequence features.
        where: config path of the tower.

    Raises:
        ValueError: the named sequence is not among ``sequences``, or none is named and
            the tower has not exactly one.
    """
    if cfg.type not in SEQUENCE_TYPES:
        return None
    section = cfg.type.value  # the TowerConfig field of this body: "transformer" | "cnn"
    wanted = getattr(cfg, section).sequence
    name = wanted or (sequences[0] if len(sequences) == 1 else None)
    if name not in sequences:
        raise ValueError(f"{where}.type={section} needs one sequence feature to run over "
                         f"(set {where}.{section}.sequence, now {wanted!r}); sequences in "
                         f"this tower: {list(sequences)}")
    return name


def fusion_groups(cfg: TowerConfig, names: Sequence[str], where: str) -> dict[str, list[str]]:
    """The configured fusion groups of a ``type=fusion`` tower, plus ``rest``.

    Args:
        cfg: the tower config (its ``fusion`` section is set).
        names: the tower's selected features, in tower order.
        where: config path of the tower.

    Returns:
        group name -> member names; features in no group form the group ``rest``.

    Raises:
        ValueError: a group name is empty or dotted, a member is not a feature of the
            tower, or a group is called ``rest`` while some features are in no group.
    """
    groups = {g: list(members) for g, members in cfg.fusion.groups.items()}
    dotted = [g for g in groups if "." in g or not g]
    if dotted:
        raise ValueError(f"{where}.fusion.groups: group names {dotted} must be non-empty and "
                         "contain no '.'")
    bad = [n for members in groups.values() for n in members if n not in names]
    if bad:
        raise ValueError(f"{where}.fusion.groups name {bad}, which are not features of this "
                         f"tower; accepted: {list(names)}")
    grouped = {n for members in groups.values() for n in members}
    rest = [n for n in names if n not in grouped]
    if rest:
        if "rest" in groups:
            raise ValueError(f"{where}.fusion.groups: 'rest' is reserved for the features in "
                             f"no group ({rest})")
        groups["rest"] = rest
    return groups


def check_item_multiply(aggregation: Aggregation, names: Sequence[str], id_name: str | None,
                        where: str) -> None:
    """``aggregation=sum_item_multiply`` needs the id feature and one feature besides it.

    Args:
        aggregation: the aggregation (other modes pass).
        names: the features being aggregated.
        id_name: the tower's id feature (None when it has none).
        where: config path of the aggregation.

    Raises:
        ValueError: the id feature is not among ``names``, or it is the only one.
    """
    if aggregation is not Aggregation.SUM_ITEM_MULTIPLY:
        return
    if id_name is None or id_name not in names:
        raise ValueError(f"{where}.aggregation=sum_item_multiply needs the tower's id feature "
                         f"(the categorical feature on its key column) among {list(names)}; "
                         "accepted otherwise: aggregation concat or sum")
    if len(names) < 2:
        raise ValueError(f"{where}.aggregation=sum_item_multiply needs a feature besides the "
                         f"id feature {id_name!r} to multiply")


def tie_sequence(flag: bool | None, sequence: str, sequence_dim: int, item_id: str | None,
                 item_dim: int | None, where: str = "model") -> bool:
    """Whether user history ``sequence`` shares the item tower's id embedding.

    Args:
        flag: ``model.tie_sequence_embedding``: True must tie, False never ties, None ties
            when the widths match.
        sequence: the user sequence feature.
        sequence_dim: its embedding width.
        item_id: the item tower's selected id feature whose table would be shared (None:
            there is none to share).
        item_dim: that feature's embedding width.
        where: config path of the model section.

    Raises:
        ValueError: ``flag`` is True and there is no table to share or the widths differ.
    """
    if flag is False:
        return False
    if item_id is None:
        if flag:
            raise ValueError(
                f"{where}.tie_sequence_embedding=true: user sequence {sequence!r} has no "
                "item-tower id embedding to share (the item tower must select the categorical "
                "id feature whose vocabulary the history uses); accepted otherwise: null, false")
        return False
    if item_dim != sequence_dim:
        if flag:
            raise ValueError(
                f"{where}.tie_sequence_embedding=true needs user sequence {sequence!r} "
                f"embedding_dim={sequence_dim} to equal item feature {item_id!r} "
                f"embedding_dim={item_dim}; accepted otherwise: null, false")
        return False
    return True


def window_feature(feature: str | None, sequences: Sequence[str]) -> str | None:
    """The user sequence that training windows are cut from: named, or the only one.

    Args:
        feature: ``sequence.feature`` (None: not named).
        sequences: the user sequence features.

    Returns:
        Its name, or None when it is not among ``sequences`` or none is named and there is
        not exactly one.
    """
    if feature is not None:
        return feature if feature in sequences else None
    return sequences[0] if len(sequences) == 1 else None


def window_stride(stride: int | None, feature: str, max_length: int) -> None:
    """``sequence.window_stride`` must leave no gap between consecutive windows.

    Raises:
        ValueError: naming the stride, the history's ``max_length`` and the fix.
    """
    if stride is not None and stride > max_length:
        raise ValueError(f"sequence.window_stride={stride} is longer than the {feature!r} "
                         f"history's max_length={max_length}: the transitions between two "
                         f"windows would never be trained; set it to at most {max_length} "
                         "(or null)")


def sequence_mode(objective: Objective | None, feature: str | None, cfg: TowerConfig,
                  sequences: Sequence[str], where: str = "model.user") -> str | None:
    """The user sequence trained at every position, checked against the user tower's body.

    Args:
        objective: ``sequence.objective`` (None: the interaction mode, nothing to check).
        feature: ``sequence.feature`` (None: the tower's only sequence feature).
        cfg: the user tower's config.
        sequences: the user tower's selected sequence features.
        where: config path of the user tower.

    Returns:
        The sequence feature's name (None in the interaction mode).

    Raises:
        ValueError: naming the setting, why the combination cannot train, and the fix.
    """
    if objective is None:
        return None
    mode = f"sequence.objective={objective.value}"
    if cfg.type not in SEQUENCE_TYPES:
        raise ValueError(f"{mode} trains one user state per position, but {where}.type="
                         f"{cfg.type.value} pools the history into one vector; set {where}.type "
                         "to transformer (or cnn with objective clm)")
    if len(sequences) != 1 or window_feature(feature, sequences) is None:
        raise ValueError(f"{mode} needs exactly one user sequence feature to cut windows from "
                         f"(sequence.feature={feature!r}); {where} selects {list(sequences)}: "
                         f"keep one (a second history would show each position items after it)")
    section = cfg.type.value
    body = getattr(cfg, section)
    if objective is Objective.CLM and cfg.type is TowerType.TRANSFORMER and not body.causal:
        raise ValueError(f"{mode} predicts item t + 1 at position t, but {where}.transformer."
                         "causal=false lets position t attend to t + 1, its own target; set "
                         f"{where}.transformer.causal=true (or objective mlm)")
    if objective is Objective.MLM and (cfg.type is TowerType.CNN or body.causal):
        setting = "type=cnn" if cfg.type is TowerType.CNN else "transformer.causal=true"
        raise ValueError(f"{mode} predicts masked items from both sides, but {where}."
                         f"{setting} only looks back; set {where}.type=transformer with "
                         "transformer.causal=false (or objective clm)")
    if body.pooling is not SequencePooling.LAST:
        raise ValueError(f"{mode}: the user embedding is the last position's output, but "
                         f"{where}.{section}.pooling={body.pooling.value}; set it to last")
    if cfg.mlp.norm is Norm.BATCH:
        raise ValueError(f"{mode}: {where}.mlp.norm=batch would mix positions and padding in "
                         "its statistics; set it to layer or none")
    return sequences[0]
