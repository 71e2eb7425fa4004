"""The OpenAI-compatible HTTP API over an `Engine` (text) or an encoder (embeddings).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings,
GET /health, GET /metrics (Prometheus text). Errors use OpenAI's shape
({"error": {"message", "type", "param", "code"}}) with a 4xx status for anything the client sent.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
from typing import AsyncIterator

import torch

from alloy.errors import AlloyError
from alloy.infer.sampling import Sampling
from alloy.serve.engine import ContextOverflow, Engine, Event, QueueFull, Request
from alloy.serve.metrics import Metrics
from alloy.serve.schema import ChatRequest, CompletionRequest, EmbeddingRequest

MAX_BODY_BYTES = 4 * 1024 * 1024
_ERROR_SCHEMA = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"}}}}}}}}
ERRORS = {status: {"description": what} | _ERROR_SCHEMA for status, what in (
    (400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
    (411, "no Content-Length"), (413, "body too large"), (429, "queue full: retry after Retry-After seconds"))}
RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(model, *, model_name: str, engine: Engine | None = None, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, plan_summary: str | None = None):
    """The ASGI app. `model` gives the tokenizer, the chat template and (for an encoder) the
    embeddings; `engine` generates (None for an encoder)."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = Metrics()
    if engine is not None:
        engine.observer = metrics
    created = int(time.time())
    app = FastAPI(title="Alloy", description=f"OpenAI-compatible API serving {model_name}", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return JSONResponse(error_body(err.message, err.kind, err.code, err.param), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"msg": "invalid request", "loc": (), "type": ""}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message, code = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", "invalid_json"
        elif not where:
            message, code = f"the body must be a JSON object ({first['msg']})", "invalid_json"
        else:
            message, code = f"{where}: {first['msg']}", "invalid_value"
        return JSONResponse(error_body(message, "invalid_request_error", code, where or None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), err.status_code)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        """The body size limit and the API key, before any route runs."""
        size = request.headers.get("content-length")
        if size is None and request.method == "POST":
            return JSONResponse(error_body("a POST needs a Content-Length (chunked bodies are not taken)",
                                           "invalid_request_error", "length_required"), 411)
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            return JSONResponse(error_body(f"the request body is over {max_body_bytes} bytes", "invalid_request_error",
                                           "request_too_large"), 413)
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                               "authentication_error", "invalid_api_key"), 401)
        return await call_next(request)

    def _check_model(body):
        if body.model != model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model_not_found", "model")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name,
                "active": engine.active if engine else 0, "queued": engine.queue_depth if engine else 0}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        if engine is not None:
            metrics.queue_depth.set(engine.queue_depth)
            metrics.active.set(engine.active)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "alloy", **({"plan": plan_summary} if plan_summary else {})}]}

    def _need_engine():
        if engine is None:
            raise ApiError(400, f"{model_name} is an encoder: it serves /v1/embeddings, not text generation",
                           code="unsupported_model")

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest):
        _check_model(body)
        _need_engine()
        prompt = body.prompt if isinstance(body.prompt, list) else _encode(model, body.prompt)
        gen = _request(body, prompt, body.max_tokens, body.logprobs or 0, model, engine)
        return await _respond(body, gen, "text_completion", prompt, metrics)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(body: ChatRequest):
        _check_model(body)
        _need_engine()
        from alloy.infer.tokenize import apply_chat_template

        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            rendered = apply_chat_template(model, messages)
        except AlloyError as err:
            raise ApiError(400, str(err), code="chat_template") from None
        prompt = _encode(model, rendered, special=False)
        top = (body.top_logprobs or 1) if body.logprobs else 0
        gen = _request(body, prompt, body.max_completion_tokens or body.max_tokens, top, model, engine)
        return await _respond(body, gen, "chat.completion", prompt, metrics)

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(body: EmbeddingRequest):
        _check_model(body)
        if model.spec.causal:
            raise ApiError(400, f"{model_name} generates text; /v1/embeddings needs an encoder model "
                                "(BERT-family, e.g. all-MiniLM-L6-v2)", code="unsupported_model")
        inputs = [item if isinstance(item, list) else _encode(model, item) for item in body.input]
        too_long = [len(ids) for ids in inputs if len(ids) > model.spec.max_seq_len]
        if too_long:
            raise ApiError(400, f"an input has {too_long[0]} tokens; the model takes {model.spec.max_seq_len}",
                           code="context_length_exceeded", param="input")
        bad = [t for ids in inputs for t in ids if not 0 <= t < model.spec.vocab_size]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary: {bad[:5]}", param="input")
        vectors = await asyncio.to_thread(sentence_embeddings, model, inputs)
        metrics.requests.labels("embeddings").inc()
        data = []
        for i, vector in enumerate(vectors):
            value = (base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
                     if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _respond(body, gen: Request, kind: str, prompt: list[int], metrics: Metrics):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = engine.submit(gen, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFull as err:
            metrics.rejected.inc()
            raise ApiError(429, str(err), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ContextOverflow as err:
            raise ApiError(400, str(err), code="context_length_exceeded", param="max_tokens") from None
        except AlloyError as err:
            raise ApiError(400, str(err)) from None
        metrics.requests.labels("chat" if kind == "chat.completion" else "completions").inc()
        metrics.prompt_tokens.inc(len(prompt))
        ident = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        shape = _Shape(kind, ident, model_name, int(time.time()))
        if body.stream:
            from starlette.background import BackgroundTask

            # the background task runs however the response ends, even when the client left before
            # the first chunk (then the generator's own cleanup never runs)
            return StreamingResponse(_stream(events, handle, shape, len(prompt), body.include_usage, model),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(handle.cancel))
        pieces, logprobs, finish, count = [], [], None, 0
        try:
            while True:
                event = await events.get()
                if event.token is not None:
                    count += 1
                    pieces.append(event.text)
                    if event.logprob is not None:
                        logprobs.append(_token_logprob(model, event))
                if event.finish_reason is not None:
                    finish = event.finish_reason
                    if event.error:
                        raise ApiError(500, f"generation failed: {event.error}", "server_error")
                    break
        finally:
            handle.cancel()  # no-op when done; frees the row when the client went away mid-wait
        usage = {"prompt_tokens": len(prompt), "completion_tokens": count, "total_tokens": len(prompt) + count}
        return shape.whole("".join(pieces), finish, logprobs if gen.logprobs else None, usage)

    def openapi():
        """FastAPI's schema, with `model` narrowed to the one this server serves (clients and
        generated tests see the only valid value)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("CompletionRequest", "ChatRequest", "EmbeddingRequest"):
                model_field = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
                if "model" in model_field:
                    model_field["model"]["enum"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _encode(model, text: str, special: bool = True) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ApiError(400, "the model has no tokenizer.json; send token ids as the prompt", param="prompt")
    encoding = tokenizer.encode(text, add_special_tokens=special)
    # a tokenizer.json may pad every input (MiniLM's pads to 128): keep the real tokens only
    return [i for i, real in zip(encoding.ids, encoding.attention_mask) if real]


def _request(body, prompt: list[int], max_tokens: int | None, logprobs: int, model, engine: Engine) -> Request:
    if max_tokens is None:  # chat without a limit: as much as the context leaves
        max_tokens = max(1, engine.ctx_size - len(prompt))
    try:
        defaults = sampling_defaults(model)
        penalty = body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
        sampling = Sampling(temperature=defaults["temperature"] if body.temperature is None else body.temperature,
                            top_p=defaults["top_p"] if body.top_p is None else body.top_p, seed=body.seed,
                            top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                            repetition_penalty=1.0 if penalty is None else penalty)
    except AlloyError as err:
        raise ApiError(400, str(err)) from None
    from alloy.infer.tokenize import eos_ids

    return Request(prompt=prompt, max_tokens=max_tokens, sampling=sampling, stop=body.stop, logprobs=logprobs,
                   eos_ids=frozenset(eos_ids(model)))


def sampling_defaults(model) -> dict:
    """What a request that names no temperature / top_p gets: the model's generation_config.json
    (greedy when it says do_sample: false), else OpenAI's defaults (1.0 and 1.0)."""
    raw = getattr(model, "side_files", {}).get("generation_config.json")
    config = json.loads(raw) if raw else {}
    if config and not config.get("do_sample", False):
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def _token_logprob(model, event: Event) -> dict:
    decode = (lambda t: model.tokenizer.decode([t])) if getattr(model, "tokenizer", None) else str
    return {"token": decode(event.token), "logprob": event.logprob,
            "top": [(decode(t), lp) for t, lp in (event.top_logprobs or [])]}


class _Shape:
    """OpenAI's JSON for one completion: whole, or as stream chunks."""

    def __init__(self, kind: str, ident: str, model: str, created: int):
        self.kind, self.ident, self.model, self.created = kind, ident, model, created

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def _envelope(self, chunk: bool) -> dict:
        kind = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, items: list[dict] | None):
        if items is None:
            return None
        if self.chat:
            return {"content": [{"token": i["token"], "logprob": i["logprob"], "bytes": list(i["token"].encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                                  for t, lp in i["top"]]} for i in items]}
        return {"tokens": [i["token"] for i in items], "token_logprobs": [i["logprob"] for i in items],
                "top_logprobs": [dict(i["top"]) for i in items], "text_offset": None}

    def whole(self, text: str, finish: str, logprobs, usage: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self._logprobs(logprobs),
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        return self._envelope(False) | {"choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None, logprobs=None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": self._logprobs(logprobs), "finish_reason": finish}
        return self._envelope(True) | {"choices": [choice]}


async def _stream(events: asyncio.Queue, handle, shape: _Shape, prompt_tokens: int, include_usage: bool,
                  model) -> AsyncIterator[bytes]:
    def sse(doc: dict) -> bytes:
        return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n".encode()

    count = 0
    try:
        if shape.chat:
            yield sse(shape.chunk(None, None, first=True))
        while True:
            event = await events.get()
            if event.token is not None:
                count += 1
                logprobs = [_token_logprob(model, event)] if event.logprob is not None else None
                if event.text or logprobs:
                    yield sse(shape.chunk(event.text, None, logprobs))
            if event.finish_reason is not None:
                if event.error:
                    yield sse(error_body(f"generation failed: {event.error}", "server_error"))
                else:
                    yield sse(shape.chunk(None, event.finish_reason))
                break
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                     "total_tokens": prompt_tokens + count}
            yield sse(shape._envelope(True) | {"choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
    finally:
        handle.cancel()  # the client went away (or we are done): free the row at the next step


@torch.inference_mode()
def sentence_embeddings(model, inputs: list[list[int]]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states, as sentence-transformers computes them."""
    longest = max(len(ids) for ids in inputs)
    pad = model.spec.pad_token_id or 0
    ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids in inputs])
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in inputs])
    hidden = model(ids, attention_mask=mask).float()
    weights = mask[..., None].to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def serve(app, engine: Engine | None, *, host: str, port: int) -> None:
    """Serve `app` until SIGINT / SIGTERM. With an engine: HTTP from a thread and the engine's loop
    in this one, the thread that loaded the model (why: Engine.run_here)."""
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    if engine is None:
        server.run()
        return

    def stop(*_):
        server.should_exit = True
        engine.stop()

    def http():
        try:
            server.run()
        finally:
            engine.stop()  # the server ended (stopped, or it could not listen): so does the engine

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    web = threading.Thread(target=http, name="alloy-http", daemon=True)
    web.start()
    try:
        engine.run_here()
    finally:
        server.should_exit = True
        web.join(timeout=30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise AlloyError(f"could not serve on {host}:{port} (in use, or not an address of this machine)")
