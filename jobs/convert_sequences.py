r"""Convert a sequence file (``user item item ...`` per line, oldest first) -> the three tables.

Inputs: ``--src``, a text file (``.gz`` too) with one line per user: the user id, then the
user's items in time order, whitespace-separated (``--sep`` for another separator). The
format of the sequential-recommendation benchmarks (e.g. Amazon Sports and Outdoors as
the S3-Rec / ICLRec papers publish it), and of any event log that kept only the order.
Outputs: ``OUT/interactions/`` (``user_id``, ``item_id``, ``timestamp`` = the item's
position on its line), ``OUT/users/`` (``user_id``), ``OUT/items/`` (``item_id``); see
:mod:`prepare.sources.sequences`. Then ``configs/amazon_sports.yaml`` is the config to copy.

    python -m jobs.convert_sequences --src ../shared/data/amazon-sports/Sports_and_Outdoors.txt \\
        --out /tmp/amazon-sports
    ray job submit --working-dir . -- python -m jobs.convert_sequences \\
        --src /shared/sequences.txt --out /shared/data/sequences
"""

from __future__ import annotations

import argparse

from jobs.cli import doc_parser, user_errors
from prepare.sources.sequences import IdType, convert_sequences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's flags."""
    parser = doc_parser(__doc__)
    parser.add_argument("--src", required=True, help="The sequence file (.gz allowed), e.g. "
                        "--src Sports_and_Outdoors.txt.")
    parser.add_argument("--out", required=True, help="Output folder (outside the repository "
                        "when the data's licence forbids redistribution), e.g. --out "
                        "data/amazon-sports.")
    parser.add_argument("--sep", default=None, help="Token separator (default: whitespace), "
                        "e.g. --sep ','.")
    parser.add_argument("--id-type", choices=[t.value for t in IdType], default="auto",
                        help="Key type: int64 when every id is an integer (auto), or forced, "
                        "e.g. --id-type string.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and convert; an unreadable file or line exits 1 with the reason."""
    args = parse_args(argv)
    with user_errors():
        counts = convert_sequences(args.src, args.out, sep=args.sep, id_type=args.id_type)
    print(f"wrote {args.out}: " + ", ".join(f"{n:,} {name}" for name, n in counts.items()))


if __name__ == "__main__":
    main()
