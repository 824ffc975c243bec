r"""Convert MovieLens: a downloaded MovieLens folder -> the three Parquet tables.

Inputs: ``--src``, an unpacked ml-100k, ml-1m or ml-20m/25m/latest folder.
Outputs: ``OUT/interactions/``, ``OUT/users/``, ``OUT/items/`` (see
:mod:`prepare.sources.movielens` for the columns). MovieLens may not be redistributed:
keep ``OUT`` outside the repository.

    python -m jobs.convert_movielens --src ../shared/data/ml-100k --out /tmp/ml100k
    ray job submit --working-dir . -- python -m jobs.convert_movielens \
        --src /shared/ml-100k --out /shared/data/ml100k
"""

from __future__ import annotations

import argparse

from jobs.cli import doc_parser, user_errors
from prepare.sources.movielens import convert_movielens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's flags."""
    parser = doc_parser(__doc__)
    parser.add_argument("--src", required=True,
                        help="The unpacked MovieLens folder, e.g. --src ~/Downloads/ml-100k.")
    parser.add_argument("--out", required=True,
                        help="Output folder, outside the repository, e.g. --out data/ml100k.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and convert; an unreadable or unknown folder exits 1 with the reason."""
    args = parse_args(argv)
    with user_errors():
        counts = convert_movielens(args.src, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
