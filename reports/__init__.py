"""The front door's generated pages: the config reference and the results page.

``reports.config_page`` writes ``docs/config.md`` from the config's pydantic models;
``reports.records`` reads the committed benchmark records in ``results/``;
``reports.results_page`` renders ``docs/results.md`` and its plots from them. The command
is ``python -m jobs.docs`` (``--check`` tells whether the committed pages are current).
Imports ``pipeline`` only; benchmarks write records through ``benchmarks.record``.
"""
