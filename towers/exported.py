"""Loading an exported tower: torch and its JSON sidecar only, none of the model code.

Serving imports this module, never :mod:`towers.model`: the program written by
:func:`towers.export.export_tower` carries the whole computation. ``PATH`` with suffix
``.json`` holds the input spec, the output key and width, and the caller's metadata.

    tower = ExportedTower(RUN_DIR / "model" / "user_tower.pt2")
    emb = tower({"user_id": ids, ...})["user_emb"]  # [B, D]
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "torch.export"
# torch.load falls back to weights_only=False (a pickle, so any code) for some archive
# entries unless this is set; the jobs and the replicas carry it in their environment.
WEIGHTS_ONLY_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
# what a torch.export archive of plain tensors holds, relative to its root folder
_ARCHIVE_ENTRY = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/[\w.]+|models/\w+\.json|extra/[\w.]+"
    r"|data/weights/(weight_\d+|\w+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|\w+_constants_config\.json)"
    r"|data/sample_inputs/\w+\.pt)")
_PAYLOAD_PREFIX = {"weights": "weight_", "constants": "tensor_"}


def sidecar_path(path: str | Path) -> Path:
    """The JSON written next to an exported program (same name, suffix ``.json``)."""
    return Path(path).with_suffix(".json")


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
        check_archive(self.path)
        os.environ.update(WEIGHTS_ONLY_ENV)  # torch reads it at each torch.load
        self.program = torch.export.load(str(self.path)).module()
        self._checked: set[tuple] = set()  # input layouts (dtypes, trailing dims) checked

    def __call__(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tower's inputs ([B, ...] each) -> ``{output_key: [B, D]}``.

        The program's input check (a forward pre-hook torch.export adds: dtypes, shapes
        against the exported ranges) runs once per input layout; later calls with that
        layout go to ``forward`` directly. The check costs 0.4-0.7 ms a call here, about
        as much as the forward of a small tower, and a serving replica repeats one
        layout with only the batch size changing (exported as dynamic).
        """
        missing = [k for k in self.spec["inputs"] if k not in features]
        if missing:
            raise ValueError(f"{self.path}: inputs {missing} are missing; the tower reads "
                             f"{list(self.spec['inputs'])}")
        inputs = {k: features[k] for k in self.spec["inputs"]}
        layout = tuple((v.dtype, tuple(v.shape[1:])) for v in inputs.values())
        with torch.no_grad():
            if layout in self._checked:
                return self.program.forward(inputs)
            out = self.program(inputs)
        self._checked.add(layout)
        return out


def check_archive(path: str | Path) -> None:
    """Refuse an exported program that would unpickle anything when loaded.

    ``torch.export.load`` unpickles weights and constants whose payload config says
    ``use_pickle``, ``custom_obj_`` / ``opaque_obj_`` constants (``pickle.loads``, which
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` does not reach), legacy ``.pt`` weight files, and
    sample inputs that ``weights_only`` refuses. A tower written by
    :func:`towers.export.export_tower` holds plain tensors only, so anything else in the
    archive is refused here, before torch reads it.

    Raises:
        ValueError: naming the archive and the entry.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                _check_entry(archive, name, path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"exported tower {path} is not a torch.export archive: {err}") \
            from None


def _check_entry(archive: zipfile.ZipFile, name: str, path: str | Path) -> None:
    inner = name.split("/", 1)[1] if "/" in name else name
    if name.endswith("/"):
        return
    refuse = f"exported tower {path}: entry {name} "
    if not _ARCHIVE_ENTRY.fullmatch(inner):
        raise ValueError(refuse + "is not part of a plain-tensor torch.export archive "
                         "(pickled weights, custom or opaque objects, compiled code); "
                         "refused before loading")
    if inner.endswith(("_weights_config.json", "_constants_config.json")):
        prefix = _PAYLOAD_PREFIX[inner.split("/")[1]]
        config = json.loads(archive.read(name)).get("config", {})
        for fqn, meta in config.items():
            if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(prefix):
                raise ValueError(refuse + f"loads {fqn} from {meta.get('path_name')!r} "
                                 f"with pickle (use_pickle={meta.get('use_pickle')}); only "
                                 f"plain {prefix}N tensors are accepted; refused before "
                                 "loading")
    elif inner.startswith("data/sample_inputs/"):
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)
        except Exception as err:  # noqa: BLE001 - whatever weights_only refuses
            raise ValueError(refuse + "is not a weights-only tensor file "
                             f"({type(err).__name__}); refused before loading") from None


def load_exported(path: str | Path) -> ExportedTower:
    """Load a tower written by :func:`export_tower`."""
    return ExportedTower(path)
