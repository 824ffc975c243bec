"""Entry points run with ``python -m jobs.NAME`` or ``ray job submit -- python -m jobs.NAME``."""
