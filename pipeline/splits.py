"""Split labels of the prepared tables, and which splits a model trains on.

``prepare/split.py`` computes the leave-last-out split; these labels are its contract with
training, evaluation and the run directory.
"""

from __future__ import annotations

TRAIN, VALIDATION, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VALIDATION: "validation", TEST: "test"}


def trained_on(refit: bool) -> tuple[int, ...]:
    """The splits a model trains on: TRAIN, and VALIDATION too when it is refit.

    ``train.refit`` trains the final model on training + validation interactions for the
    epochs chosen on validation, as the matrix-factorisation rows of EVALUATION.md are
    refit; the test targets are never trained on either way.
    """
    return (TRAIN, VALIDATION) if refit else (TRAIN,)
