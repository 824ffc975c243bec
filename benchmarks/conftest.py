"""The benchmarks' own checks (``benchmarks/test_*.py``) use the tests' session fixtures.

The tests never import ``benchmarks``; these checks of a benchmark's internals (its
references, its arithmetic) live beside it and share the suite's Ray session and demo runs.
"""

from tests.conftest import (  # noqa: F401  (fixtures, registered by import)
    demo_data,
    demo_prepared,
    ml100k_dir,
    ray_session,
    refit_runs,
)
