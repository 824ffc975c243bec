"""Retrieval quality on MovieLens-100K: ``benchmarks.quality --data ml100k``.

The whole ``jobs.pipeline`` with ``configs/ml100k.yaml`` per seed (0 1 2 by default), next to
tuned EASE and ALS on the same split and the reference rows of ``../shared/EVALUATION.md``
(RecBole's SASRec among them). Every flag of :mod:`benchmarks.quality` applies.

    python -m benchmarks.ml100k_quality                  # seeds 0 1 2
    python -m benchmarks.ml100k_quality --seeds 0        # one seed
"""

from __future__ import annotations

import sys

from benchmarks.quality import main as quality_main


def main(argv: list[str] | None = None) -> dict:
    """Run the ML-100K quality benchmark (``--data ml100k`` unless given)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return quality_main(argv if "--data" in argv else ["--data", "ml100k", *argv])


if __name__ == "__main__":
    main()
