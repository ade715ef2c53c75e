"""The HTTP server: `ServeConfig`, the routes, the bridge from engine events to a JSON body or an event stream,
`build_app`, `serve` and `running`.

Endpoints: GET /, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics. The
routes read what they serve from `app.state`. Not here: OpenAI's formats (protocol.py), the key and body checks in
front of the app (guard.py), batching and sampling (engine.py), loading a model (the CLI's loader does that).
"""

from __future__ import annotations

import asyncio
import errno
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from nomoat.chat import render_chat, turn_closer
from nomoat.errors import UserError
from nomoat.model import Transformer
from nomoat.serve.engine import Engine, Event, Generation, QueueFull, SamplingParams
from nomoat.serve.guard import MAX_BODY_BYTES, Guard, error_response
from nomoat.serve.metrics import Metrics
from nomoat.serve.protocol import (
    DONE,
    MAX_CHOICES,
    MAX_STOPS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Reply,
    SamplingRequest,
    error_body,
    sse,
    usage,
)
from nomoat.tokenizer import Tokenizer

__all__ = ["ServeConfig", "bind", "build_app", "running", "serve"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How `nomoat serve` serves: where, behind which key, and how much work it takes on at once."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    no_api_key: bool = False  # serve a non-local address to anyone, said explicitly
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # sequences waiting for a slot before requests get 429
    max_context: int = 4096  # tokens per sequence, when the model's own context is longer
    compile: bool = True  # decode through generate.py's compiled step (compiled once, at start-up)
    name: str | None = None  # the model id clients send and /v1/models lists; None: from the model's folder

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_queue, self.max_context - 1) < 1:
            raise UserError(
                f"--max-batch and --max-queue must be at least 1 and --max-context at least 2 "
                f"(got {self.max_batch}, {self.max_queue} and {self.max_context})"
            )
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port} is not a port number")
        if self.no_api_key and self.api_key is not None:
            raise UserError("--api-key and --no-api-key contradict each other: give one")
        if self.name is not None and not self.name.strip():
            raise UserError("--name is empty: give the model id to serve, or leave it out for the folder's name")


def keyed(cfg: ServeConfig) -> ServeConfig:
    """cfg, with a fresh random key (printed once, as Jupyter prints its token) when it would serve a non-local
    address to anyone without the user having said --no-api-key."""
    if cfg.host in LOCAL_HOSTS or cfg.api_key is not None:
        return cfg
    if cfg.no_api_key:
        print(f"nomoat: warning: serving on {cfg.host} with no key (--no-api-key): anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
        return cfg
    key = secrets.token_urlsafe(24)
    print(
        f"nomoat: {cfg.host} is not a local address, so the API needs a key; this run's key is {key}\n"
        f"nomoat: send 'Authorization: Bearer {key}' (or give --api-key KEY, or --no-api-key to serve anyone)",
        file=sys.stderr,
    )
    return replace(cfg, api_key=key)


# --- errors: every one, ours or the framework's, in OpenAI's shape ---


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.param, e.code)


async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return error_response(400, f"the body is not valid JSON: {first.get('msg')}")
    where = ".".join(loc)
    return error_response(400, f"{where or 'body'}: {first.get('msg')}", where or None)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail))


async def crash(request: Request, e: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(e).__name__}")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    APIError: api_error,
    RequestValidationError: invalid,
    StarletteHTTPException: http_error,
    Exception: crash,
}


# --- a request's text and numbers, checked against the model served, as engine input ---


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(
            404, f"the model {name!r} does not exist; this server has {served!r}", "model", "model_not_found"
        )


def unsupported(body: BaseModel, *names: str) -> None:
    """Refuse, rather than silently ignore, what a client would rely on (lm-eval's loglikelihood needs logprobs
    and echo)."""
    for name in names:
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server", name, "unsupported_parameter")


def sampling(body: SamplingRequest, max_tokens: int | None, default_max: int, context: int) -> SamplingParams:
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


def encode(tokenizer: Tokenizer, text: str, param: str) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON may escape a lone surrogate, which no tokenizer takes
        raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param) from None
    return tokenizer.encode(text)


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt: a completion takes a text, texts, ids, or lists of ids."""
    prompt = body.prompt
    if isinstance(prompt, str):
        raw = [encode(tokenizer, prompt, "prompt")]
    elif prompt and all(isinstance(x, str) for x in prompt):
        raw = [encode(tokenizer, x, "prompt") for x in prompt]  # type: ignore[arg-type]
    elif prompt and all(isinstance(x, int) for x in prompt):
        raw = [prompt]  # type: ignore[list-item]
    else:
        raw = list(prompt)  # type: ignore[arg-type]
    if not raw:
        raise APIError(400, "the prompt is empty", "prompt")
    return raw  # type: ignore[return-value]


def check_prompt(ids: list[int], context: int, vocab_size: int) -> list[int]:
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
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise APIError(400, f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    return ids


def chat_text(body: ChatRequest, tokenizer: Tokenizer) -> str:
    """The conversation rendered by the model's chat template, up to the assistant's turn."""
    messages = [
        {
            "role": m.role,
            "content": m.content if isinstance(m.content, str) else "".join(x.text for x in m.content or []),
        }
        for m in body.messages
    ]
    try:
        return render_chat(tokenizer, messages, add_generation_prompt=True)
    except UserError as e:
        raise APIError(400, str(e), "messages") from None


# --- from engine events to the answer ---


class Job:
    """One request's sequences in the engine (n per prompt), and the queue their events reach the event loop on
    from the engine thread. All or none are queued: QueueFull is a 429."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, n: int) -> None:
        self.engine, self.prompts, self.finished = engine, prompts, 0
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emitter(index: int) -> Callable[[Event], None]:
            return lambda event: loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

        self.seqs: list[Generation] = []
        try:
            for p, prompt in enumerate(prompts):
                self.seqs += engine.submit(prompt, params, [emitter(p * n + j) for j in range(n)])
        except QueueFull as e:
            engine.cancel(self.seqs)
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from None

    @property
    def running(self) -> bool:
        return self.finished < len(self.seqs)

    async def next(self, timeout: float | None = None) -> tuple[int, Event]:
        """The next event of any choice (asyncio.TimeoutError when none comes within timeout seconds)."""
        i, event = await asyncio.wait_for(self.events.get(), timeout)
        self.finished += event.finish_reason is not None
        return i, event

    def usage(self) -> dict[str, int]:  # read once the sequences are done
        return usage(sum(len(p) for p in self.prompts), sum(s.generated for s in self.seqs))

    def cancel(self) -> None:
        self.engine.cancel(self.seqs)


async def answer(
    request: Request, prompts: list[list[int]], params: SamplingParams, body: SamplingRequest, reply: Reply
) -> Response:
    """Submit n sequences per prompt and answer as one JSON body, or as server-sent events when body.stream."""
    n = body.n or 1
    if n * len(prompts) > MAX_CHOICES:
        raise APIError(400, f"n times the number of prompts is {n * len(prompts)}; at most {MAX_CHOICES}", "n")
    job = Job(request.app.state.engine, prompts, params, n)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = stream(job, reply, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await collect(request, job, reply)


async def collect(request: Request, job: Job, reply: Reply) -> Response:
    """Wait for every choice, then answer with the whole body; 499 if the client goes away first."""
    texts, reasons = [""] * len(job.seqs), [None] * len(job.seqs)
    try:
        while job.running:
            try:
                i, event = await job.next(timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            if event.finish_reason == "error":
                raise APIError(500, "generation failed")
            texts[i] += event.text
            if event.finish_reason is not None:
                reasons[i] = event.finish_reason
    finally:
        job.cancel()
    return JSONResponse(reply.whole(texts, reasons, job.usage()))


async def stream(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """Each choice's text as it comes, then its finish_reason in a chunk of its own; usage if asked; DONE."""
    try:
        for chunk in reply.opening(len(job.seqs)):
            yield sse(chunk)
        while job.running:
            i, event = await job.next()
            if event.finish_reason == "error":
                yield sse(error_body(500, "generation failed"))
                return
            if event.text:
                yield sse(reply.chunk(i, event.text, None))
            if event.finish_reason is not None:
                yield sse(reply.chunk(i, "", event.finish_reason))
        if include_usage:
            yield sse(reply.usage_chunk(job.usage()))
        yield DONE
    finally:  # also when the client went away: the slots free at the next step
        job.cancel()


# --- the routes (registered in build_app) ---


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page_html)


async def health(request: Request) -> dict:
    engine = request.app.state.engine
    return {"status": "ok", "queue_depth": engine.queue_depth, "running": engine.active}


async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


async def models(request: Request) -> dict:
    state = request.app.state
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "nomoat",
        "max_model_len": state.engine.max_len,
    }
    return {"object": "list", "data": [card]}


async def completions(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state
    context, tokenizer = state.engine.max_len, state.tokenizer
    check_model(body.model, state.model_name)
    unsupported(body, "logprobs", "echo")
    prompts = [check_prompt(ids, context, tokenizer.vocab_size) for ids in completion_prompts(body, tokenizer)]
    params = sampling(body, body.max_tokens, 16, context)  # OpenAI's default for completions
    return await answer(request, prompts, params, body, Reply.new(state.model_name, chat=False))


async def chat_completions(body: ChatRequest, request: Request) -> Response:
    state = request.app.state
    context, tokenizer = state.engine.max_len, state.tokenizer
    check_model(body.model, state.model_name)
    unsupported(body, "logprobs", "tools")
    prompt = check_prompt(encode(tokenizer, chat_text(body, tokenizer), "messages"), context, tokenizer.vocab_size)
    params = sampling(body, body.max_completion_tokens or body.max_tokens, context - len(prompt), context)
    if state.closer:
        params = replace(params, stop=(*params.stop, state.closer))
    return await answer(request, [prompt], params, body, Reply.new(state.model_name, chat=True))


# --- the app, and serving it ---


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine thread starts and stops with the app."""
    app.state.engine.start()
    yield
    app.state.engine.stop()


def build_app(model: Transformer, tokenizer: Tokenizer, model_name: str, cfg: ServeConfig | None = None) -> Guard:
    """The ASGI app: the routes behind the Guard, with what they serve in `app.state`."""
    cfg = cfg or ServeConfig()
    metrics = Metrics()
    app = FastAPI(
        title="nomoat", lifespan=lifespan, docs_url=None, redoc_url=None, exception_handlers=EXCEPTION_HANDLERS
    )
    app.get("/", response_class=HTMLResponse, include_in_schema=False)(page)
    app.get("/health")(health)
    app.get("/metrics", response_class=PlainTextResponse)(prometheus)
    app.get("/v1/models")(models)
    app.post("/v1/completions")(completions)
    app.post("/v1/chat/completions")(chat_completions)
    state = app.state
    state.cfg, state.model_name, state.tokenizer, state.metrics = cfg, model_name, tokenizer, metrics
    state.engine = Engine(
        model, tokenizer, cfg.max_batch, cfg.max_queue, cfg.max_context, metrics=metrics, compile=cfg.compile
    )
    state.created = int(time.time())
    state.page_html = resources.files("nomoat.serve").joinpath("page.html").read_text()
    try:  # what the template writes after a reply ("<|im_end|>", "<|eot_id|>"): a stop string even when only text
        state.closer = turn_closer(tokenizer)
    except UserError:
        state.closer = ""
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    return Guard(app, cfg.api_key, MAX_BODY_BYTES, metrics, paths)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, taken before the model loads, so that a busy port is one line at once
    rather than an error after a minute of loading (connections made meanwhile wait in the backlog)."""
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a just-closed server's port
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:  # socket.gaierror for an unknown host name is one too
        sock.close()
        why = "the port is in use (another server is on it?)" if e.errno == errno.EADDRINUSE else e.strerror or e
        raise UserError(f"cannot serve on {host}:{port}: {why}") from None
    return sock


def served_name(ckpt: Any, cfg: ServeConfig) -> str:
    """--name, or the model's folder: a run's name for one of its checkpoints (runs/a/checkpoints/step_N)."""
    if cfg.name is not None:
        return cfg.name.strip()
    return ckpt.path.name if not ckpt.path.name.startswith("step_") else ckpt.path.parent.parent.name


def serve(ckpt: Any, cfg: ServeConfig, sock: socket.socket | None = None) -> None:
    """Serve a loaded model (anything with `.model`, `.tokenizer` and `.path`, as a Checkpoint has) until Ctrl-C,
    on `sock` when the caller bound the port before loading (`bind`), else on cfg's host and port."""
    cfg = keyed(cfg)
    app = build_app(ckpt.model, ckpt.tokenizer, served_name(ckpt, cfg), cfg)
    if cfg.compile:  # paid once here, so that no request waits for it
        print(f"nomoat: decode step compiled in {app.app.state.engine.warm_up():.1f} s", file=sys.stderr)
    run_server(app, host=cfg.host, port=cfg.port, sock=sock)


def run_server(app: Guard, host: str, port: int, sock: socket.socket | None = None) -> None:
    """Answer HTTP from a thread and run the app's engine on this one, the main thread (Engine.run says why),
    until Ctrl-C or SIGTERM, which stop both gracefully."""
    import uvicorn

    sock = sock or bind(host, port)
    engine = app.app.state.engine
    engine.running = True  # the loop is this thread's: the app's lifespan then starts no thread for it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nomoat-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():  # uvicorn has printed why (the address in use, say)
            raise UserError(f"could not serve on {host}:{port}")
        time.sleep(0.05)
    name, port = app.app.state.model_name, sock.getsockname()[1]  # the port taken, also for --port 0
    print(f"nomoat: serving {name!r} on http://{host}:{port}/ (chat page) and /v1", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: a graceful stop, as uvicorn's own
    try:
        engine.run()  # until the server stops it (its lifespan's end), Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


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
