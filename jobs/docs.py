"""Docs: the config models and the committed records -> ``docs/config.md``, ``docs/results.md``.

Inputs: the pydantic models of ``pipeline/config/`` and ``pipeline/features/``, and the
benchmark records in ``results/*.json``. Outputs: ``docs/config.md``, ``docs/results.md``,
the plots ``docs/img/*.png`` it shows (matplotlib, Agg) and the results table of
``README.md`` (between its ``results:begin`` / ``results:end`` markers). ``--check``
writes nothing and exits 1, naming each page, when a committed page differs from what it
would write (the tests run it). Runs on the driver only: there is no ``ray job submit`` form.

    python -m jobs.docs                  # regenerate both pages and the plots
    python -m jobs.docs --only config    # docs/config.md alone (no matplotlib needed)
    python -m jobs.docs --check          # exit 1 when a committed page is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import doc_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("config", "results")


def pages(only: tuple[str, ...], results: Path, docs: Path, plots: bool) -> dict[Path, str]:
    """Page path -> its generated text (the plots are written as a side effect when asked)."""
    out = {}
    if "config" in only:
        from reports.config_page import render

        out[docs / "config.md"] = render()
    if "results" in only:
        from reports.results_page import render, with_readme_block

        out[docs / "results.md"] = render(results, docs / "img" if plots else None)
        readme = docs.parent / "README.md"
        out[readme] = with_readme_block(readme.read_text(), results)
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse flags; write the pages, or with --check compare them and exit 1 on a difference."""
    p = doc_parser(__doc__)
    p.add_argument("--only", choices=PAGES, action="append",
                   help="Render this page only (repeatable), e.g. --only config.")
    p.add_argument("--check", action="store_true",
                   help="Write nothing; exit 1 when a committed page differs, e.g. --check.")
    p.add_argument("--results", default=str(ROOT / "results"),
                   help="Folder of the records, e.g. --results results.")
    p.add_argument("--docs", default=str(DOCS), help="Folder of the pages, e.g. --docs docs.")
    args = p.parse_args(argv)
    generated = pages(tuple(args.only or PAGES), Path(args.results), Path(args.docs),
                      plots=not args.check)
    if args.check:
        stale = [str(path) for path, text in generated.items()
                 if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"stale: {path} differs from what `python -m jobs.docs` generates",
                  file=sys.stderr)
        raise SystemExit(1 if stale else 0)
    for path, text in generated.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
