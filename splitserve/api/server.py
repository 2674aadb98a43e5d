"""The OpenAI-compatible HTTP front: routes, authorization and the request body's size limit.

Pydantic lives at this boundary only. Token generation happens in the engine workers; the shared
request path (request_path.py) turns tokens into text and text into SSE, and the two endpoint
adapters (endpoints.py) say what chat and text completions do differently.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from splitserve.api.cluster_routes import add_cluster_routes
from splitserve.api.endpoints import ChatEndpoint, CompletionEndpoint
from splitserve.api.errors import APIError, error_body, install_error_handlers
from splitserve.api.metrics import ServerMetrics
from splitserve.api.prompt import PromptBuilder, parse_body
from splitserve.api.protocol import ChatCompletionRequest, CompletionRequest
from splitserve.api.request_path import serve
from splitserve.cluster.gateway import Cluster
from splitserve.models.tokenizer import Tokenizer

MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass
class ServerState:
    client: Cluster
    tokenizer: Tokenizer
    model_name: str
    model_aliases: frozenset[str]
    max_model_len: int
    max_inflight: int  # the bound on sub-requests accepted and not yet answered (see inflight_limit)
    api_key: str | None
    metrics: ServerMetrics
    started: float
    # Tokenize control-token spellings in user text as plain text for every request (a request
    # may also ask for it with `split_special_tokens`).
    split_special_tokens: bool = False
    admitted: int = 0  # sub-requests accepted and not yet answered: the bounded queue
    chat_template: str | None = None  # --chat-template FILE's text
    tool_call_parser: str | None = None  # --tool-call-parser NAME (None: from the chat template)
    seats_per_worker: int = 0  # > 0: the bound follows the serving pool's size as it scales
    prompt_builder: PromptBuilder = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_builder = PromptBuilder(self.tokenizer, self.max_model_len)

    def inflight_limit(self) -> int:
        """Seats per worker times the decode (or aggregated) pool's target: a pool scaled at run
        time takes as many more requests as it has seats, and a shrunk one queues fewer."""
        targets = getattr(self.client, "targets", None)
        if not self.seats_per_worker or not targets:
            return self.max_inflight
        return self.seats_per_worker * max(1, targets.get("decode", targets.get("both", 1)))


# ---- ASGI guards -------------------------------------------------------------------------------
class BodySizeLimit:
    """Reject bodies over the limit before they are buffered, declared length or not."""

    def __init__(self, app, limit: int = MAX_REQUEST_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body exceeds {self.limit} bytes")
            return msg

        return await self.app(scope, limited_receive, send)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                     code="413")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(state: ServerState, lifespan=None) -> FastAPI:
    app = FastAPI(title="splitserve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.s = state
    install_error_handlers(app, lambda status: state.metrics.request_errors.labels(state.model_name,
                                                                                  str(status)).inc())

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), state.api_key.encode()):
            raise APIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.client.healthy:
            return Response(status_code=200)
        return JSONResponse(error_body("engine not ready", "service_unavailable", code="503"), status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/cluster")
    async def cluster(request: Request):
        authorize(request)
        info = state.client.info()
        # Every request the workers are generating was admitted here first: adding the two counts
        # counted it twice. The larger still shows a request one side forgot (the leak checks).
        info["generating"] = info["gateway_inflight"]
        info["gateway_inflight"] = max(state.admitted, info["generating"])
        return info

    add_cluster_routes(app, state, authorize)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "splitserve",
                "root": state.model_name, "max_model_len": state.max_model_len}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id not in state.model_aliases:
            raise APIError(404, f"The model `{model_id}` does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card()

    async def parse(request: Request, cls):
        authorize(request)
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone mid-body (or cut by --body-timeout): nobody reads an answer
            raise APIError(400, "the client disconnected before sending the whole body") from None
        try:
            req = await state.prompt_builder.run(parse_body, raw, cls)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        if req.model is not None and req.model not in state.model_aliases:
            raise APIError(404, f"the model `{req.model}` does not exist", "not_found_error", "model", "model_not_found")
        try:
            req.check_unsupported()
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return req

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatCompletionRequest)
        return await serve(state, request, req, ChatEndpoint(state, req))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        return await serve(state, request, req, CompletionEndpoint(state, req))

    return BodySizeLimitApp(app)


def BodySizeLimitApp(app: FastAPI):
    wrapped = BodySizeLimit(app)
    wrapped.state = app.state  # tests reach the state through the app
    return wrapped
