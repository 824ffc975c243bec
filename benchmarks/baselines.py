"""EASE and implicit ALS on a prepared run's split, tuned on validation, scored like Towerline.

Both read ``RUN_DIR/prepared/`` (the same leave-last-out split the pipeline trained on) and
rank the full catalogue with ``indexing.metrics.retrieval_metrics``, the code that scores
Towerline, so the rows sit side by side. As ``../shared/EVALUATION.md`` does for its
references, each hyper-parameter is chosen on the validation targets (a model fit on the
training interactions, scored for each user from the training history), then the chosen
setting is refit on training + validation and scored once on the test targets.

    python -m benchmarks.baselines RUN_DIR          # prints both rows (validation and test)

EASE (Steck, 2019) is ``B = I - P / diag(P)`` with ``P = (X^T X + lambda I)^-1``, the
diagonal of B zeroed; a user's scores are ``x_u B``. ALS is the ``implicit`` package's
(a dev dependency: ``pip install -e .[dev]``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from indexing.eval_set import EvalSet, load_eval_set
from indexing.metrics import retrieval_metrics
from pipeline.run_dir import RunDir, read_prepare_manifest

EASE_LAMBDAS = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)
ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0)}
SELECT_BY = "NDCG@10"

Fit = Callable[[np.ndarray, dict], tuple[np.ndarray, np.ndarray]]  # X, params -> (U, V)


def history_matrix(eval_set: EvalSet, num_items: int) -> np.ndarray:
    """[U, I] float32 0/1 matrix of each evaluated user's history (repeats counted once)."""
    x = np.zeros((len(eval_set), num_items), np.float32)
    rows = np.repeat(np.arange(len(eval_set)), np.diff(eval_set.history_offsets))
    x[rows, eval_set.history_items] = 1.0
    return x


def ease(x: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """EASE fitted on ``x`` [U, I]: returns (user vectors x, item vectors B^T) so scores = x B."""
    gram = x.T.astype(np.float64) @ x
    gram[np.diag_indices_from(gram)] += params["lambda"]
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return x, b.T.astype(np.float32)


def als(x: np.ndarray, params: dict) -> tuple[np.ndarray, np.ndarray]:
    """ALS of the ``implicit`` package fitted on ``x`` [U, I]: factors (U, V).

    Confidence ``1 + alpha x``; BLAS kept to one thread, as ``implicit`` asks.
    """
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit checks it when the model is made
        model = AlternatingLeastSquares(factors=params["factors"], alpha=params["alpha"],
                                        regularization=params["regularization"], iterations=15,
                                        random_state=0, num_threads=2)
        model.fit(sp.csr_matrix(x), show_progress=False)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def score(fit: Fit, params: dict, eval_set: EvalSet, num_items: int
          ) -> dict[str, dict[str, float]]:
    """Fit on the split's histories and rank its targets: exact metrics.

    Masked, unmasked and over new targets (:func:`~indexing.metrics.retrieval_metrics`).
    """
    users, items = fit(history_matrix(eval_set, num_items), params)
    return retrieval_metrics(torch.from_numpy(np.ascontiguousarray(users)),
                             torch.from_numpy(np.ascontiguousarray(items)),
                             eval_set.targets, eval_set.history_offsets,
                             eval_set.history_items)


def tuned(name: str, fit: Fit, grid: Iterable[dict], run: RunDir) -> dict:
    """Choose params on validation (masked), refit on train + validation, score test once."""
    num_items = read_prepare_manifest(run).items
    validation, test = load_eval_set(run, "validation"), load_eval_set(run, "test")
    start = time.perf_counter()
    tried = [(params, score(fit, params, validation, num_items)["masked"]) for params in grid]
    best, best_val = max(tried, key=lambda pm: pm[1][SELECT_BY])
    test_metrics = score(fit, best, test, num_items)
    return {"model": name, "params": best, "validation": best_val,
            "test": test_metrics["masked"], "test_unmasked": test_metrics["unmasked"],
            "test_new_targets": test_metrics["new_targets"],
            "tried": [{"params": p, SELECT_BY: m[SELECT_BY]} for p, m in tried],
            "seconds": round(time.perf_counter() - start, 1)}


def run_baselines(run_dir: str | Path) -> list[dict]:
    """Tuned EASE and tuned ALS on ``RUN_DIR/prepared``."""
    run = RunDir(run_dir)
    als_grid = [dict(zip(ALS_GRID, v, strict=True))
                for v in itertools.product(*ALS_GRID.values())]
    return [tuned("EASE, tuned", ease, [{"lambda": v} for v in EASE_LAMBDAS], run),
            tuned("implicit ALS, tuned", als, als_grid, run)]


def main(argv: list[str] | None = None) -> list[dict]:
    """Print both baselines' chosen params and figures for one prepared run directory."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="A RUN_DIR with prepared/ (jobs.prepare).")
    args = p.parse_args(argv)
    rows = run_baselines(args.run_dir)
    for r in rows:
        print(json.dumps({k: r[k] for k in ("model", "params", "validation", "test",
                                            "seconds")}))
    return rows


if __name__ == "__main__":
    main()
