r"""Make demo data: sizes and a seed -> the three synthetic Parquet tables configs/demo.yaml reads.

Inputs: ``--regime`` (default, long, sparse: see :mod:`prepare.sources.demo`), and
``--users``, ``--items``, ``--interactions`` (default: the regime's sizes), ``--seed``.
Outputs: ``OUT/users/``, ``OUT/items/``, ``OUT/interactions/`` (see :mod:`prepare.sources.demo`
for the columns and the planted structure); progress is printed to stderr per chunk.

    python -m jobs.make_demo_data --out data/demo --users 5000 --items 2000 \
        --interactions 300000
    python -m jobs.make_demo_data --out data/sparse --regime sparse
    ray job submit --working-dir . -- python -m jobs.make_demo_data \
        --out /shared/data/demo --users 200000 --items 50000 --interactions 10000000
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import doc_parser, user_errors
from prepare.sources.demo import REGIMES, generate_demo_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's flags."""
    parser = doc_parser(__doc__)
    parser.add_argument("--out", required=True,
                        help="Output folder (its tables must be empty), e.g. --out data/demo.")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="default",
                        help="Shape of the data: default, long (MovieLens-like histories) or "
                        "sparse (e-commerce: short histories, day-level time, no user "
                        "features), e.g. --regime long.")
    parser.add_argument("--users", type=int,
                        help="Number of users (default: the regime's), e.g. --users 5000.")
    parser.add_argument("--items", type=int,
                        help="Number of items (default: the regime's), e.g. --items 2000.")
    parser.add_argument("--interactions", type=int,
                        help="Total interactions, at least 5 per user (default: the regime's), "
                        "e.g. --interactions 300000.")
    parser.add_argument("--seed", type=int, default=0, help="Random seed, e.g. --seed 1.")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, int]:
    """Generate the tables; returns the row counts per table."""
    return generate_demo_data(
        args.out, n_users=args.users, n_items=args.items, n_interactions=args.interactions,
        seed=args.seed, log=lambda m: print(m, file=sys.stderr, flush=True),
        regime=args.regime,
    )


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run; a bad size or a non-empty output exits 1 with the reason."""
    args = parse_args(argv)
    with user_errors():
        counts = run(args)
    print(f"wrote {args.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
