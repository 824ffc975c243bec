"""A bad request's 4xx body: the error raised, the entries merged, bounded and made JSON-safe.

:class:`RequestError` names the field of one request; :func:`explain` turns pydantic's
validation errors into at most ``serve.max_errors`` entries whose echoed inputs are
summarised and always valid JSON (NaN, Infinity and lone surrogates included).
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.config.serve import ServeConfig
from serve_app.schemas import BOUND_TYPES, BOUNDS


class RequestError(ValueError):
    """A request the retriever cannot answer; names the field and the value.

    Args:
        loc: path of the field in the body, e.g. ``("features", "age")``.
        value: the offending value.
        message: what is wrong and what would be accepted.
    """

    status_code = 422
    error_type = "value_error"

    def __init__(self, loc: tuple[str | int, ...], value: Any, message: str):
        super().__init__(message)
        self.loc, self.value, self.message = loc, value, message

    def detail(self) -> dict[str, Any]:
        """One entry of the response's ``detail`` list (FastAPI's error shape)."""
        return {"type": self.error_type, "loc": ["body", *self.loc], "msg": self.message,
                "input": summarize(self.value)}


class UnknownItemError(RequestError):
    """An item id that is not in the catalogue (HTTP 404)."""

    status_code = 404
    error_type = "unknown_item"


def summarize(value: Any, limit: int = 20) -> Any:
    """A value as echoed in an error: long lists become ``"<list of N>"``."""
    if isinstance(value, (list, tuple)) and len(value) > limit:
        return f"<list of {len(value)}>"
    if isinstance(value, dict) and len(value) > limit:
        return f"<object of {len(value)} keys>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > 200:
        return f"<string of {len(value)} characters>"
    return value


def json_safe(value: Any) -> Any:
    r"""``value`` with what strict JSON cannot hold made text, so any 4xx body encodes.

    A request parsed by Python's ``json`` may hold NaN and +-Infinity (not JSON numbers:
    echoed as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``) and lone surrogates
    such as ``"\ud800"`` (not encodable as UTF-8: each becomes U+FFFD), in values and in
    object keys alike. Anything that is not a JSON type is echoed as its type name.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value).replace("inf", "Infinity") \
            .replace("nan", "NaN")
    if isinstance(value, bool | int | None):
        return value
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return f"<{type(value).__name__}>"


def cap_errors(errors: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` entries: the first ``limit - 1`` and one that counts the rest."""
    if len(errors) <= limit:
        return errors
    rest = len(errors) - (limit - 1)
    return [*errors[:limit - 1], {
        "type": "too_many_errors", "loc": ["body"], "input": None,
        "msg": f"{rest} more errors not listed; at most {limit} entries are "
               "(serve.max_errors)"}]


def _is_union_tag(part: Any) -> bool:
    """A pydantic union member's tag in an error's loc (``constrained-int``, ``list[...]``)."""
    return isinstance(part, str) and (
        part in ("int", "float", "str", "bool", "none", "list", "dict")
        or part.startswith(("constrained-", "list[", "dict[", "function-")))


def merge_errors(errors: list[dict[str, Any]], prefix: tuple = ()) -> list[dict[str, Any]]:
    """Pydantic errors as 4xx details: union tags dropped from ``loc``, one entry per field.

    A value that fits no member of a union (``int | str``) gives one pydantic error per
    member; they become one entry whose message lists what each member wanted.
    """
    merged: dict[tuple, dict[str, Any]] = {}
    for err in errors:
        loc = (*prefix, *(p for p in err.get("loc", ()) if not _is_union_tag(p)))
        msg = str(err.get("msg", ""))
        msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
        if loc in merged:
            if msg not in merged[loc]["msg"]:
                merged[loc]["msg"] += f"; or: {msg}"
            if err.get("type") in BOUND_TYPES:  # the member that came closest names it
                merged[loc]["type"] = err["type"]
            continue
        merged[loc] = {"type": err.get("type", "value_error"), "loc": list(loc), "msg": msg,
                       "input": summarize(err.get("input"))}
    return list(merged.values())


def explain(errors: list[dict[str, Any]], cfg: ServeConfig) -> list[dict[str, Any]]:
    """FastAPI's validation errors in the 4xx shape, each bound named by its setting.

    Args:
        errors: ``RequestValidationError.errors()`` of one request.
        cfg: the deployment's serve config (the bounds' values).
    """
    out = merge_errors(errors)
    for err in out:
        field = next((p for p in err["loc"][1:2] if isinstance(p, str)), "")
        path = ".".join(map(str, err["loc"][1:])) or "body"
        setting = BOUNDS.get(field) if field else \
            ("max_events" if len(err["loc"]) == 1 else None)  # only /events' body is a list
        if err["type"] in ("too_long", "less_than_equal") and setting:
            err["msg"] = (f"{path}: {err['msg']}; at most {getattr(cfg, setting)} "
                          f"(serve.{setting})")
        elif err["type"] == "string_too_long":
            err["msg"] = (f"{path}: {err['msg']} (serve.max_string_length="
                          f"{cfg.max_string_length})")
        elif path != "body":
            err["msg"] = f"{path}: {err['msg']}"
    return out
