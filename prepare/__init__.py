"""The prepare stage: read, check, split, fit and write the prepared tables.

Ray Data reads and writes (one process for small inputs); everything it shares with
training and serving (config, columns, fitted state, row encoders, the run directory) is
in ``pipeline``. ``jobs.prepare`` is the entry point; :func:`prepare.run.run_prepare` the
function it calls.
"""
