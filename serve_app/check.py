"""Whether a run directory loads for serving: what a replica's ``reconfigure`` does, once.

:func:`check_run_dir` loads the :class:`~serve_app.retriever.Retriever` (model, index behind
its version guard, catalogue against the index's catalogue hash, user-state store, feature
state) and answers a request, raising what a replica would (a truncated index, a missing
column or key, a foreign feature state). ``python -m jobs.check RUN_DIR`` is its command.
"""

from __future__ import annotations

from typing import Any

from serve_app.retriever import Retriever
from serve_app.schemas import RecommendRequest


def check_run_dir(run_dir: str, user_id: Any = None) -> dict[str, Any]:
    """Load ``run_dir``, answer a cold-start request (and one for ``user_id``, if given).

    Raises what a replica's load would raise.
    """
    retriever = Retriever(run_dir)
    retriever.recommend([RecommendRequest(history=[], k=1)])
    if user_id is not None:
        retriever.recommend([RecommendRequest(user_id=user_id, k=1)])
    return {"run_dir": str(retriever.run_dir), **retriever.info().model_dump(mode="json")}
