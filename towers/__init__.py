"""PyTorch towers: feature encoders, tower bodies, the two-tower model, losses and top-k.

This package depends on torch, numpy and ``pipeline``'s contracts only; it never imports
ray, so a Serve replica or a notebook can load a tower without a cluster. Import the
submodules directly (``towers.model``, ``towers.export``, ...); this file imports nothing.
"""
