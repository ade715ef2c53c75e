"""The OpenAI-compatible HTTP API over the engine, and the chat page at `/`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics. Every
error, ours or the framework's, is OpenAI's `{"error": {"message", "type", "param", "code"}}`. Requests carry
text and numbers only: no field names a file. Not here: batching and sampling (engine.py).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nomoat.chat import render_chat, turn_closer
from nomoat.errors import UserError
from nomoat.model import Transformer
from nomoat.serve.engine import Engine, Event, Generation, QueueFull, SamplingParams
from nomoat.serve.metrics import Metrics
from nomoat.tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 16  # n times the number of prompts
MAX_STOPS = 4
OPEN_PATHS = ("/", "/health")  # the page holds no data and asks for the key itself; probes need no key
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields completions and chat share. Strict: "5" is not a number, as with OpenAI."""

    model_config = ConfigDict(strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # declared only to refuse them: see unsupported()
    echo: bool | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None


class Guard:
    """ASGI middleware in front of everything: the API key, the body size limit and request counting.

    The body is read here, up to the limit, and replayed to the app; later reads go to the client again, so that
    a disconnect still reaches the handlers."""

    def __init__(self, app: Any, api_key: str | None, max_body: int, metrics: Metrics, paths: set[str]) -> None:
        self.app, self.api_key, self.max_body, self.metrics, self.paths = app, api_key, max_body, metrics, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.count_request(endpoint, message["status"])
            await send(message)

        async def reply(status: int, message: str, code: str | None = None) -> None:
            await error_response(status, message, code=code)(scope, receive, counted_send)

        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await reply(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
        too_big = f"the request body is over {self.max_body} bytes"
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body:
            return await reply(413, too_big)
        body, more = bytearray(), True
        while more:  # the declared length may be absent (chunked) or a lie, so count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await reply(413, too_big)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, counted_send)


def build_app(
    model: Transformer,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    max_context: int = 4096,
    max_body: int = MAX_BODY_BYTES,
) -> Any:
    """The ASGI app: FastAPI routes behind the Guard. The engine thread starts and stops with the app's lifespan."""
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch, max_queue, max_context, metrics=metrics)
    context = engine.max_len
    created = int(time.time())
    page_html = resources.files("nomoat.serve").joinpath("page.html").read_text()
    try:  # what the template writes after a reply ("<|im_end|>", "<|eot_id|>"): a stop string even when only text
        closer = turn_closer(tokenizer)
    except UserError:
        closer = ""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nomoat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
        where = ".".join(loc)
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404, f"the model {name!r} does not exist; this server has {model_name!r}", "model", "model_not_found"
            )

    def sampling(body: SamplingRequest, max_tokens: int | None, default_max: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > context:
            raise APIError(400, f"max_tokens is {max_tokens}; the model's context is {context} tokens", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
        return SamplingParams(
            max_tokens=max_tokens or default_max,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=tuple(s for s in stops if s),
        )

    def unsupported(body: BaseModel, *names: str) -> None:
        """Refuse, rather than silently ignore, what a client would rely on (lm-eval's loglikelihood needs
        logprobs and echo)."""
        for name in names:
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")

    def encode(text: str, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON may escape a lone surrogate, which no tokenizer takes
            raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
        return tokenizer.encode(text)

    def check_prompt(ids: list[int]) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) >= context:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {context}, "
                "which must also hold at least one new token",
                "prompt",
                "context_length_exceeded",
            )
        if min(ids) < 0 or max(ids) >= tokenizer.vocab_size:
            raise APIError(400, f"prompt token ids must lie in [0, {tokenizer.vocab_size})", "prompt")
        return ids

    async def run(
        request: Request,
        prompts: list[list[int]],
        params: SamplingParams,
        body: SamplingRequest,
        chunk: Callable[[int, str, str | None], dict],
        whole: Callable[[list[str], list[str | None]], dict],
        opening: Callable[[int], dict] | None = None,
    ) -> Response:
        """Submit n sequences per prompt and answer as one JSON body or as server-sent events (after an opening
        chunk per choice, if given: chat announces the assistant's role)."""
        n = body.n or 1
        if n * len(prompts) > MAX_CHOICES:
            raise APIError(400, f"n times the number of prompts is {n * len(prompts)}; at most {MAX_CHOICES}", "n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def emitter(index: int) -> Callable[[Event], None]:
            return lambda event: loop.call_soon_threadsafe(events.put_nowait, (index, event))

        seqs: list[Generation] = []
        try:
            for p, prompt in enumerate(prompts):
                seqs += engine.submit(prompt, params, [emitter(p * n + j) for j in range(n)])
        except QueueFull as e:
            engine.cancel(seqs)
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from None

        def usage() -> dict[str, int]:  # read once the sequences are done
            prompt_tokens, completion_tokens = sum(len(p) for p in prompts), sum(s.generated for s in seqs)
            total = prompt_tokens + completion_tokens
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def sse() -> AsyncIterator[str]:
                try:
                    for i in range(len(seqs) if opening else 0):
                        yield f"data: {json.dumps(opening(i))}\n\n"
                    done = 0
                    while done < len(seqs):
                        i, event = await events.get()
                        if event.finish_reason == "error":
                            yield f"data: {json.dumps(error_body(500, 'generation failed'))}\n\n"
                            return
                        if event.text:
                            yield f"data: {json.dumps(chunk(i, event.text, None))}\n\n"
                        if event.finish_reason is not None:
                            done += 1
                            yield f"data: {json.dumps(chunk(i, '', event.finish_reason))}\n\n"
                    if include_usage:
                        yield f"data: {json.dumps({**chunk(0, '', None), 'choices': [], 'usage': usage()})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # also when the client went away: the slots free at the next step
                    engine.cancel(seqs)

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * len(seqs), [None] * len(seqs)
        done = 0
        try:
            while done < len(seqs):
                try:
                    i, event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if event.finish_reason == "error":
                    raise APIError(500, "generation failed")
                texts[i] += event.text
                if event.finish_reason is not None:
                    reasons[i] = event.finish_reason
                    done += 1
        finally:
            engine.cancel(seqs)
        return JSONResponse({**whole(texts, reasons), "usage": usage()})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue_depth": engine.queue_depth, "running": engine.active}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "nomoat", "max_model_len": context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        unsupported(body, "logprobs", "echo")
        p = body.prompt
        if isinstance(p, str):
            raw = [encode(p, "prompt")]
        elif p and all(isinstance(x, str) for x in p):
            raw = [encode(x, "prompt") for x in p]  # type: ignore[arg-type]
        elif p and all(isinstance(x, int) for x in p):
            raw = [p]  # type: ignore[list-item]
        else:
            raw = list(p)  # type: ignore[arg-type]
        if not raw:
            raise APIError(400, "the prompt is empty", "prompt")
        prompts = [check_prompt(ids) for ids in raw]
        params = sampling(body, body.max_tokens, 16)  # OpenAI's default for completions
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}

        def chunk(i: int, text: str, reason: str | None) -> dict:
            return {**head, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

        def whole(texts: list[str], reasons: list[str | None]) -> dict:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
            return {**head, "choices": choices}

        return await run(request, prompts, params, body, chunk, whole)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        check_model(body.model)
        unsupported(body, "logprobs", "tools")
        messages = [
            {
                "role": m.role,
                "content": m.content if isinstance(m.content, str) else "".join(x.text for x in m.content or []),
            }
            for m in body.messages
        ]
        try:
            text = render_chat(tokenizer, messages, add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, str(e), "messages") from None
        prompt = check_prompt(encode(text, "messages"))
        params = sampling(body, body.max_completion_tokens or body.max_tokens, context - len(prompt))
        if closer:
            params = replace(params, stop=(*params.stop, closer))
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}

        def chunk(i: int, text: str, reason: str | None) -> dict:
            delta = {"content": text} if text else {}
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        def opening(i: int) -> dict:
            delta = {"role": "assistant", "content": ""}
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]}

        def whole(texts: list[str], reasons: list[str | None]) -> dict:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
            return {**head, "object": "chat.completion", "choices": choices}

        return await run(request, [prompt], params, body, chunk, whole, opening)

    paths = {r.path for r in app.routes if hasattr(r, "path")}
    return Guard(app, api_key, max_body, metrics, paths)


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    device: str = "cpu",
    max_batch: int = 16,
    max_queue: int = 64,
    max_context: int = 4096,
) -> None:
    """Load a checkpoint or Hugging Face folder and serve it until Ctrl-C."""
    import uvicorn

    from nomoat.checkpoint import load_checkpoint

    if min(max_batch, max_queue, max_context - 1) < 1:
        raise UserError(
            f"--max-batch and --max-queue must be at least 1 and --max-context at least 2 "
            f"(got {max_batch}, {max_queue} and {max_context})"
        )
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(
            f"nomoat: warning: serving on {host} without --api-key: anyone who can reach it can use it", file=sys.stderr
        )
    ckpt = load_checkpoint(model_path, device=device)
    name = ckpt.path.name if not ckpt.path.name.startswith("step_") else ckpt.path.parent.parent.name
    app = build_app(ckpt.model, ckpt.tokenizer, name, api_key, max_batch, max_queue, max_context)
    print(f"nomoat: serving {name!r} on http://{host}:{port}/ (chat page) and /v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@contextmanager
def running(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve app on a free port from a background thread for the duration of a with block; yields the base URL
    (for tests, benchmarks and notebooks)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped while starting")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()
