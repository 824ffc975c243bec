"""Every config key does something: each field of every config section is read by code.

A key that nothing reads silently ignores the user who sets it (STYLE habit 12). The
check walks every pydantic model reachable from :class:`pipeline.config.Config` and looks
for a read of each field in the source packages: an attribute access ``x.field``
outside the model's own class body (its validators do not count as a use), or the name
as a string in a function that reads fields with ``getattr``.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pydantic
import pytest

from pipeline.config import Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "prepare", "towers", "indexing", "training", "serve_app", "jobs")


def config_models(model: type[pydantic.BaseModel], seen: dict | None = None) -> dict:
    """Name -> class of ``model`` and every pydantic model its fields can hold."""
    seen = {} if seen is None else seen
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        for cls in _models_in(field.annotation):
            config_models(cls, seen)
    return seen


def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


class _Reads(ast.NodeVisitor):
    """Field names read in one module, skipping ``self.x`` inside config classes."""

    def __init__(self, config_classes: set[str]):
        self.config_classes = config_classes
        self.names: set[str] = set()
        self._inside: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._inside.append(node.name)
        self.generic_visit(node)
        self._inside.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        own = (self._inside and self._inside[-1] in self.config_classes
               and isinstance(node.value, ast.Name) and node.value.id == "self")
        if not own:
            self.names.add(node.attr)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        calls_getattr = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                            and n.func.id == "getattr" for n in ast.walk(node))
        if calls_getattr:
            self.names.update(n.value for n in ast.walk(node)
                              if isinstance(n, ast.Constant) and isinstance(n.value, str))
        self.generic_visit(node)


def reads_in_sources(config_classes: set[str]) -> set[str]:
    names: set[str] = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            visitor = _Reads(config_classes)
            visitor.visit(ast.parse(path.read_text(encoding="utf-8")))
            names |= visitor.names
    return names


def all_config_models() -> dict:
    """Every section model, and every registered feature kind's config (the ``features``
    union is built from the registry at validation time, so the walk adds them here)."""
    from pipeline.features import REGISTRY

    seen = config_models(Config)
    for spec in REGISTRY.values():
        config_models(spec.config, seen)
    return seen


MODELS = all_config_models()


def test_the_walk_reaches_every_section():
    for name in ("DataConfig", "FeaturesConfig", "CategoricalFeature", "SequenceFeature",
                 "ModelConfig", "TowerConfig", "FusionConfig", "LossConfig", "TrainConfig",
                 "MLflowConfig", "IndexConfig", "ServeConfig", "PrepareConfig"):
        assert name in MODELS, sorted(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_field_is_read_by_code(name):
    read = reads_in_sources(set(MODELS))
    unread = [f for f in MODELS[name].model_fields if f not in read]
    assert unread == [], f"{name} fields that no code reads: {unread}"


def test_the_check_catches_an_unread_field():
    class Probe(pydantic.BaseModel):
        surely_nobody_reads_this_field: int = 0

    read = reads_in_sources(set(MODELS))
    assert "surely_nobody_reads_this_field" not in read
