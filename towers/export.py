"""Per-tower export: a self-contained ``torch.export`` program plus a JSON sidecar.

The artifact (``PATH``, e.g. ``user_tower.pt2``) takes the tower's preprocessed feature
tensors as one dict and returns ``{"<name>_emb": [B, D]}`` (TorchEasyRec's tower
wrappers); any batch size >= 1 works. ``PATH`` with suffix ``.json`` holds the input spec,
the output key and width, and the caller's metadata (model version, resolved config).

Loading needs torch only::

    program = torch.export.load("user_tower.pt2").module()
    emb = program({"user_id": ids, ...})["user_emb"]

``torch.export`` rather than TorchScript: ``torch.jit.trace`` / ``script`` emit
deprecation warnings in torch 2.13 ("switch to torch.compile or torch.export").
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from towers.features import Spec
from towers.model import Tower

TOWER_NAMES = ("user", "item")
FORMAT = "torch.export"


def sidecar_path(path: str | Path) -> Path:
    """The JSON written next to an exported program (same name, suffix ``.json``)."""
    return Path(path).with_suffix(".json")


class EmbeddingOutput(nn.Module):
    """Wraps a tower so its output is ``{"<name>_emb": [B, D]}``."""

    def __init__(self, tower: Tower, key: str):
        super().__init__()
        self.tower, self.key = tower, key

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tower's inputs -> ``{key: [B, D]}``."""
        return {self.key: self.tower(features)}


def _check_example(example: Mapping[str, Tensor], spec: Spec, name: str) -> None:
    """An example batch must hold exactly the spec's keys, dtypes and shapes, B >= 2."""
    missing = [k for k in spec if k not in example]
    extra = [k for k in example if k not in spec]
    if missing or extra:
        raise ValueError(f"{name} tower example: missing inputs {missing}, unexpected inputs "
                         f"{extra}; expected {list(spec)}")
    sizes = {int(example[k].shape[0]) if example[k].dim() else 0 for k in spec}
    if len(sizes) != 1 or min(sizes) < 2:
        raise ValueError(f"{name} tower example: every input needs the same batch size >= 2 "
                         f"(a size-1 batch would be baked into the program); got {sorted(sizes)}")
    for key, (dtype, tail) in spec.items():
        t = example[key]
        if str(t.dtype).removeprefix("torch.") != dtype or tuple(t.shape[1:]) != tail:
            raise ValueError(f"{name} tower example {key!r}: got {t.dtype} {tuple(t.shape)}, "
                             f"expected {dtype} [B, {', '.join(map(str, tail))}]")


def export_tower(tower: Tower, name: str, example: dict[str, Tensor], path: str | Path,
                 metadata: Mapping[str, Any] | None = None) -> None:
    """Write one tower as a ``torch.export`` program (eval mode) and its JSON sidecar.

    Args:
        tower: the tower to export (put back in its previous train / eval mode after).
        name: ``"user"`` or ``"item"``; the output key is ``"<name>_emb"``.
        example: a batch of the tower's inputs, each [B, ...] with B >= 2; the batch
            dimension is exported as dynamic.
        path: the program file (``.pt2``); the sidecar goes to ``path`` with ``.json``.
        metadata: JSON-able extras for the sidecar (model version, resolved config).

    Raises:
        ValueError: for an unknown name or an example that does not match the tower.
    """
    if name not in TOWER_NAMES:
        raise ValueError(f"export name {name!r} must be one of {TOWER_NAMES}")
    spec = tower.input_spec()
    _check_example(example, spec, name)
    key = f"{name}_emb"
    batch = torch.export.Dim("batch")
    inputs = {k: example[k] for k in spec}
    was_training = tower.training
    tower.eval()
    try:
        program = torch.export.export(EmbeddingOutput(tower, key), (inputs,),
                                      dynamic_shapes=({k: {0: batch} for k in spec},))
    finally:
        tower.train(was_training)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    sidecar = {
        "format": FORMAT,
        "tower": name,
        "output": key,
        "output_dim": tower.output_dim(),
        "normalized": tower.normalize,
        "inputs": {k: {"dtype": dtype, "shape": ["B", *tail]} for k, (dtype, tail) in spec.items()},
        "torch_version": torch.__version__,
        "metadata": dict(metadata or {}),
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")


class ExportedTower:
    """A loaded tower program: ``tower(features) -> {"<name>_emb": [B, D]}``.

    Uses torch and the JSON sidecar only, none of the training code. Keys of ``features``
    that the tower does not read are ignored, so one request batch can feed both towers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        side = sidecar_path(self.path)
        if not self.path.exists() or not side.exists():
            raise ValueError(f"exported tower {self.path} needs both the program and {side}; "
                             "write them with towers.export.export_tower")
        self.spec: dict[str, Any] = json.loads(side.read_text(encoding="utf-8"))
        if self.spec.get("format") != FORMAT:
            raise ValueError(f"{side}: format {self.spec.get('format')!r} is not {FORMAT!r}")
        self.output_key: str = self.spec["output"]
        self.output_dim: int = self.spec["output_dim"]
        self.program = torch.export.load(str(self.path)).module()

    def __call__(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tower's inputs ([B, ...] each) -> ``{output_key: [B, D]}``."""
        missing = [k for k in self.spec["inputs"] if k not in features]
        if missing:
            raise ValueError(f"{self.path}: inputs {missing} are missing; the tower reads "
                             f"{list(self.spec['inputs'])}")
        with torch.no_grad():
            return self.program({k: features[k] for k in self.spec["inputs"]})


def load_exported(path: str | Path) -> ExportedTower:
    """Load a tower written by :func:`export_tower`."""
    return ExportedTower(path)
