"""The training task: losses, negatives, the DDP gather, the per-batch step, the loops.

Sits between ``indexing`` (top-k, metrics, evaluation) and ``serve_app``: only
:mod:`training.ray_train` imports Ray, so the step runs in a plain process too
(``python -m jobs.train --no-ray``). Checkpoints and tracking live here as well.
"""
