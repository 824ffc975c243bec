"""Training: the retrieval task, the per-batch step, evaluation, checkpoints, Ray Train.

Sits between ``towers`` (models, losses) and ``jobs`` (entry points): only
:mod:`training.ray_train` imports Ray, so the step runs in a plain process too.
"""
