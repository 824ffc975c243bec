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

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from pipeline.arrow import table_to_numpy
from pipeline.columns import TOWERS, tower_columns, tower_inputs
from pipeline.run_dir import RunDir, read_table
from towers.exported import FORMAT, ExportedTower, load_exported, sidecar_path
from towers.features import Spec
from towers.model import Tower, load_trained

__all__ = ["ExportedTower", "export_tower", "export_trained", "load_exported", "sidecar_path"]

TOWER_NAMES = TOWERS


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


def example_batch(run: RunDir, tower: str, rows: int = 4) -> dict[str, Tensor]:
    """A few real encoded rows of ``prepared/{items,users}.parquet`` (at least 2) as tensors."""
    table = read_table(run, tower)
    table = table.slice(0, rows)
    while table.num_rows < 2:  # a one-row table: repeat it (B >= 2 keeps the batch dynamic)
        table = pa.concat_tables([table, table])
    cols = table_to_numpy(table, tower_columns(table.column_names, tower))
    inputs = tower_inputs(cols, tower)
    return {k: torch.as_tensor(np.array(v, copy=True)) for k, v in inputs.items()}


def export_trained(run: RunDir, model_dir: Path, towers: tuple[str, ...] = TOWERS) -> None:
    """Export the towers of the weights in ``model_dir`` (trained on ``run``'s prepared data).

    Writes ``model_dir/{tower}_tower.pt2`` and its sidecar for each tower in ``towers``.
    """
    model, meta, _ = load_trained(RunDir(run.root), model_dir=model_dir)
    for name in towers:
        tower = getattr(model, f"{name}_tower")
        example = {k: v for k, v in example_batch(run, name).items() if k in tower.input_spec()}
        export_tower(tower, name, example, Path(model_dir) / f"{name}_tower.pt2",
                     metadata={"model_version": meta.model_version,
                               "feature_state_hash": meta.feature_state_hash})
