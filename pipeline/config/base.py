"""Which config keys the prepare step bakes into a run (one home for the rule)."""

from __future__ import annotations

# Config keys whose values the prepare step bakes into RUN_DIR/prepared (vocabularies, table
# widths, windows, the split): a later job with other values would silently train what was
# prepared, so jobs after prepare refuse them and tune.space cannot search them.
PREPARE_KEYS = ("features", "prepare.duplicates",
                "prepare.min_user_interactions", "prepare.max_user_interactions",
                "sequence.feature", "sequence.window_stride", "train.refit")


def is_prepare_key(path: str) -> bool:
    """Whether the dotted config ``path`` is (or lies under) one of :data:`PREPARE_KEYS`."""
    return any(path == key or path.startswith(key + ".") for key in PREPARE_KEYS)
