"""The cluster's operator routes: `POST /cluster/scale` and `POST /cluster/workers/{id}/drain`.

Both need the API key when one is set. Bad input answers an OpenAI-style 400 (404 for an unknown
worker) and changes nothing.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError

from splitserve.api.errors import APIError
from splitserve.api.prompt import parse_body
from splitserve.cluster.elastic import DRAIN_DEADLINE_S, MAX_DRAIN_DEADLINE_S, ScaleError, UnknownWorker

MAX_BODY_BYTES = 4096


class ScaleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefill: StrictInt | None = None
    decode: StrictInt | None = None
    drain_deadline_s: StrictFloat | StrictInt = Field(DRAIN_DEADLINE_S, ge=0, le=MAX_DRAIN_DEADLINE_S)


class DrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deadline_s: StrictFloat | StrictInt = Field(DRAIN_DEADLINE_S, ge=0, le=MAX_DRAIN_DEADLINE_S)


async def _body(request: Request, cls, empty_ok: bool):
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip() and empty_ok:
        return cls()
    try:
        return parse_body(raw, cls)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def add_cluster_routes(app: FastAPI, state, authorize) -> None:
    @app.post("/cluster/scale")
    async def scale(request: Request):
        authorize(request)
        body = await _body(request, ScaleBody, empty_ok=False)
        try:
            result = state.client.scale(body.prefill, body.decode, drain_deadline_s=float(body.drain_deadline_s))
        except ScaleError as exc:
            raise APIError(400, str(exc), param="decode" if "decode" in str(exc) else None) from None
        return {"object": "cluster.scale", **result.as_dict(), "pools": state.client.pools_info()}

    @app.post("/cluster/workers/{worker_id}/drain")
    async def drain(worker_id: str, request: Request):
        authorize(request)
        body = await _body(request, DrainBody, empty_ok=True)
        try:
            record = state.client.drain(worker_id, float(body.deadline_s))
        except UnknownWorker:
            raise APIError(404, f"no worker has the id {worker_id!r}", "not_found_error", "worker_id",
                           "worker_not_found") from None
        except ScaleError as exc:
            raise APIError(400, str(exc)) from None
        return JSONResponse({"object": "cluster.drain", "state": "draining", **record}, status_code=202)
