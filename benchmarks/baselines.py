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

Histories stay sparse (Amazon Sports: 35,598 users x 18,357 items, 8 items a row), so the
Gram matrix and every user's scores cost their non-zeros; the one dense cost is EASE's
inverse, taken in float32 through a Cholesky factor (LAPACK ``potrf`` / ``potri``), about a
minute per lambda at 18,357 items on 2 cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from scipy.linalg import lapack

from indexing.eval_set import EvalSet, load_eval_set
from indexing.metrics import metrics_of_scores
from pipeline.run_dir import RunDir, read_prepare_manifest

EASE_LAMBDAS = (1.0, 10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0)
ALS_GRID = {"factors": (32, 64, 128), "regularization": (0.01, 0.1, 1.0), "alpha": (1.0, 10.0)}
SELECT_BY = "NDCG@10"

Scorer = Callable[[slice], torch.Tensor]  # rows of users -> their [u, I] float32 scores
Fit = Callable[[sp.csr_matrix, dict], Scorer]  # X, params -> scorer


def history_matrix(eval_set: EvalSet, num_items: int) -> sp.csr_matrix:
    """[U, I] sparse float32 0/1 matrix of each evaluated user's history (repeats once)."""
    rows = np.repeat(np.arange(len(eval_set)), np.diff(eval_set.history_offsets))
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, eval_set.history_items)),
                      shape=(len(eval_set), num_items))
    x.data[:] = 1.0  # a duplicate entry was summed: count it once
    return x


def ease(x: sp.csr_matrix, params: dict) -> Scorer:
    """EASE fitted on ``x`` [U, I]; the scorer returns ``x_u B`` for a chunk of users."""
    gram = (x.T @ x).toarray()  # [I, I] float32 (x is), from the non-zeros only
    gram[np.diag_indices_from(gram)] += params["lambda"]
    chol, info = lapack.spotrf(gram, lower=0, overwrite_a=1)
    if info == 0:
        p, info = lapack.spotri(chol, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE lambda={params['lambda']}: Cholesky failed ({info})")
    p = np.triu(p) + np.triu(p, 1).T  # potri fills the upper triangle only
    b = p / -np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return lambda rows: torch.from_numpy(np.asarray(x[rows] @ b, np.float32))


def als(x: sp.csr_matrix, params: dict) -> Scorer:
    """ALS of the ``implicit`` package fitted on ``x`` [U, I]; the scorer returns ``u v^T``.

    Confidence ``1 + alpha x``; BLAS kept to one thread, as ``implicit`` asks.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit checks it when the model is made
        model = AlternatingLeastSquares(factors=params["factors"], alpha=params["alpha"],
                                        regularization=params["regularization"], iterations=15,
                                        random_state=0, num_threads=2)
        model.fit(x, show_progress=False)
    users = torch.from_numpy(np.ascontiguousarray(model.user_factors, np.float32))
    items = torch.from_numpy(np.ascontiguousarray(model.item_factors, np.float32)).T
    return lambda rows: users[rows] @ items


def score(fit: Fit, params: dict, eval_set: EvalSet, num_items: int, chunk: int = 1024
          ) -> dict[str, dict[str, float]]:
    """Fit on the split's histories and rank its targets: exact metrics.

    Masked, unmasked and over new targets (:func:`~indexing.metrics.metrics_of_scores`,
    the code behind Towerline's own figures).
    """
    scorer = fit(history_matrix(eval_set, num_items), params)
    chunks = ((rows, scorer(rows)) for rows in
              (slice(s, min(s + chunk, len(eval_set))) for s in range(0, len(eval_set), chunk)))
    return metrics_of_scores(chunks, eval_set.targets, eval_set.history_offsets,
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


def run_baselines(run_dir: str | Path, ease_lambdas: Iterable[float] | None = None
                  ) -> list[dict]:
    """Tuned EASE (over ``ease_lambdas``, default :data:`EASE_LAMBDAS`) and tuned ALS."""
    run = RunDir(run_dir)
    als_grid = [dict(zip(ALS_GRID, v, strict=True))
                for v in itertools.product(*ALS_GRID.values())]
    lambdas = EASE_LAMBDAS if ease_lambdas is None else tuple(ease_lambdas)
    return [tuned("EASE, tuned", ease, [{"lambda": v} for v in lambdas], run),
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
