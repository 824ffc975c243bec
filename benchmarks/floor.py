"""The bare deployment the serving benchmark compares against: read the body, return a constant.

No ``from __future__ import annotations`` here: ``serve.ingress`` re-wraps the route methods,
and FastAPI must see the real ``Request`` class, not a string, to pass the request in.
"""

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve

BODY = b'{"items":[],"model_version":"constant"}'


def floor_app(num_cpus: float, max_ongoing_requests: int):
    """A FastAPI ingress deployment with ``POST /recommend`` answering a constant body."""
    app = FastAPI()

    @serve.deployment(name="Floor", ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=max_ongoing_requests)
    @serve.ingress(app)
    class Floor:
        @app.post("/recommend")
        async def answer(self, request: Request) -> Response:
            await request.body()
            return Response(content=BODY, media_type="application/json")

    return Floor.bind()
