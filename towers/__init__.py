"""The model only, PyTorch only: feature encoders, tower bodies, the two-tower model, export.

Depends on torch, numpy and ``pipeline``'s contracts; never imports ray, so a Serve
replica or a notebook can load a tower without a cluster. Serving imports only
:mod:`towers.exported` (torch and a JSON sidecar), never the model classes. Import the
submodules directly (``towers.model``, ``towers.export``, ...); this file imports nothing.
"""
