"""The server against the official openai client, raw HTTP and schemathesis: a tiny random model on 127.0.0.1.

Covers formats, stop/n/seed, errors (4xx in OpenAI's shape, never 5xx), continuous batching (32 concurrent greedy
streams equal the same requests served alone), cancellation, the bounded queue and the API key.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
import schemathesis
import torch
from conftest import tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomoat.checkpoint import save_checkpoint
from nomoat.cli import main
from nomoat.config import ModelConfig
from nomoat.model import KVCache, Transformer
from nomoat.serve.app import ServeConfig, build_app, running
from nomoat.tokenizer import Tokenizer

CFG = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=96)
NAME = "tiny"
KEY = "sesame"


@dataclass
class Server:
    url: str
    app: object

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(shakespeare_shards) -> Tokenizer:
    return Tokenizer.load(shakespeare_shards[1])


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


class SlowModel(Transformer):
    """A model whose every step takes 20 ms more, so that a request outlives a cancellation by a wide margin."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        time.sleep(0.02)
        return super().forward(*args, **kwargs)


def start(app) -> Iterator[Server]:
    with running(app) as url:
        yield Server(url, app)


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[Server]:
    yield from start(build_app(tiny_model(), tokenizer, NAME, ServeConfig(max_batch=8, max_queue=64)))


@pytest.fixture(scope="module")
def slow_server(tokenizer) -> Iterator[Server]:
    torch.manual_seed(0)
    model = SlowModel(CFG).eval()
    yield from start(build_app(model, tokenizer, NAME, ServeConfig(api_key=KEY, max_batch=1, max_queue=1)))


def complete(client: openai.OpenAI, prompt: str, **kwargs):
    return client.completions.create(model=NAME, prompt=prompt, **kwargs)


def test_completion_and_chat(server):
    client = server.client()
    r = complete(client, "ROMEO:", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0
    )
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 6
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streaming_equals_whole(server):
    client = server.client()
    whole = complete(client, "KING:", max_tokens=12, temperature=0)
    chunks = list(complete(client, "KING:", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    # The raw event stream ends with OpenAI's sentinel.
    body = {"model": NAME, "prompt": "KING:", "max_tokens": 3, "stream": True}
    lines = requests.post(f"{server.url}/v1/completions", json=body).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_cuts_before_the_stop_string(server):
    client = server.client()
    text = complete(client, "ROMEO:", max_tokens=30, temperature=0).choices[0].text
    assert len(text) > 8
    stop = text[5:8]
    cut = complete(client, "ROMEO:", max_tokens=30, temperature=0, stop=[stop, "\x00never"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = complete(client, "ROMEO:", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


def test_n_and_seed(server):
    client = server.client()
    a = complete(client, "To be", max_tokens=15, temperature=1.0, n=3, seed=11)
    b = complete(client, "To be", max_tokens=15, temperature=1.0, n=3, seed=11)
    c = complete(client, "To be", max_tokens=15, temperature=1.0, n=3, seed=12)
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert [ch.index for ch in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(c.choices, key=lambda ch: ch.index)]
    batch = complete(client, ["To be", "or not"], max_tokens=4, temperature=0, n=2)  # type: ignore[arg-type]
    assert sorted(ch.index for ch in batch.choices) == [0, 1, 2, 3]
    tokens = client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert tokens.usage.prompt_tokens == 3


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"top_p": 0.0}, {"temperature": 2.0}])
def test_extreme_sampling_sampling_are_served(server, sampling):
    """Below float32's range a temperature would overflow the logits and a nucleus would hold nothing: both
    mean the most likely token."""
    r = complete(server.client(), "ROMEO:", max_tokens=4, seed=0, **sampling)
    assert r.choices[0].finish_reason in ("length", "stop")
    if sampling.get("temperature", 1) < 1e-4 or sampling.get("top_p", 1) < 1e-6:
        assert r.choices[0].text == complete(server.client(), "ROMEO:", max_tokens=4, temperature=0).choices[0].text


BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a",', 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"model": NAME}, 400),
    ("/v1/completions", {"model": NAME, "prompt": 5}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": "5"}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": -1}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 10**12}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": 9}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_p": -0.5}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 0}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 9, "stream": "yes"}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "seed": 2**70}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [[]]}, 400),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\udcff"}', 400),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("/v1/completions", {"model": NAME, "prompt": "word " * 200}, 400),
    ("/v1/completions", {"model": NAME, "prompt": ["a"] * 20}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404),
    ("/v1/completions", {"model": "../../etc/passwd", "prompt": "a"}, 404),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}], "max_completion_tokens": 0}, 400),
    ("/v1/chat/completions", {"model": NAME, "messages": "hello"}, 400),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logprobs": 1, "echo": True, "max_tokens": 1}, 400),
    ("/v1/nothing", {}, 404),
    ("/v1/completions", b"x" * (2 << 20), 413),
]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status):
    if isinstance(body, bytes):
        r = requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"})
    else:
        r = requests.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_wrong_method_and_client_errors(server):
    r = requests.get(f"{server.url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    chunked = requests.post(f"{server.url}/v1/completions", data=(b"x" * 65536 for _ in range(40)))  # no length
    assert chunked.status_code == 413 and chunked.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="context"):
        complete(server.client(), "word " * 200)


def test_health_and_metrics(server):
    assert requests.get(f"{server.url}/health").json()["status"] == "ok"
    complete(server.client(), "a", max_tokens=2, temperature=0)
    text = requests.get(f"{server.url}/metrics").text
    assert "# TYPE nomoat_time_to_first_token_seconds histogram" in text
    assert 'nomoat_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("nomoat_generated_tokens_total", "nomoat_tokens_per_second", "nomoat_queue_depth"):
        assert any(line.startswith(name + " ") for line in text.splitlines())


def test_max_context_caps_a_long_model_context(tokenizer):
    with running(build_app(tiny_model(), tokenizer, NAME, ServeConfig(max_context=16))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].max_model_len == 16
        with pytest.raises(openai.BadRequestError, match="context is 16"):
            complete(client, "word " * 20)
        r = complete(client, "ROMEO:", max_tokens=16, temperature=0)
        assert r.usage.total_tokens <= 16


@pytest.mark.slow  # 64 requests: a few seconds on a loaded machine
def test_32_concurrent_streams_equal_each_alone(server):
    """Answers do not depend on who else is in the batch, nor on joining mid-flight (8 slots, 32 clients): greedy
    ones, and seeded samples, each row with its own temperature, top_p and generator."""
    assert_concurrent_equal_alone(server)


def test_32_concurrent_streams_equal_each_alone_with_int8_weights(tokenizer):
    """The same with `--quantize int8`: the packed kernel computes each row alike whatever the batch."""
    from nomoat.quant import quantize_weights

    model = quantize_weights(tiny_model(), "int8")
    for server in start(build_app(model, tokenizer, NAME, ServeConfig(max_batch=8, max_queue=64))):
        assert_concurrent_equal_alone(server)


def assert_concurrent_equal_alone(server: Server) -> None:
    prompts = [f"{w} {i}:" * (1 + i % 4) for i, w in enumerate(["ROMEO", "JULIET", "KING", "NURSE"] * 8)]
    settings = [
        {"max_tokens": 4 + (i * 7) % 25, "temperature": 0.0}
        if i % 2
        else {"max_tokens": 4 + (i * 7) % 25, "temperature": 0.7 + i / 50, "top_p": 0.9, "seed": i}
        for i in range(32)
    ]
    client = server.client()
    pairs = list(zip(prompts, settings, strict=True))
    alone = [complete(client, p, **kw).choices[0].text for p, kw in pairs]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

        async def one(p: str, kw: dict) -> str:
            stream = await aclient.completions.create(model=NAME, prompt=p, stream=True, **kw)
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*(one(p, kw) for p, kw in pairs))

    assert asyncio.run(together()) == alone


def test_batched_decoding_equals_alone_in_the_engine():
    """Per-row KV positions: three prompts of different lengths decoded as one batch equal full forwards; the
    logits of chosen positions equal those of the full forward."""
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    cache = KVCache(CFG, 4, CFG.max_seq_len)
    cache.pos = torch.zeros(4, dtype=torch.long)
    seqs = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            scratch = KVCache(CFG, 1, len(p))
            logits = model(torch.tensor([p]), cache=scratch)
            for layer in range(CFG.n_layer):
                cache.k[layer][i, :, : len(p)] = scratch.k[layer][0]
                cache.v[layer][i, :, : len(p)] = scratch.v[layer][0]
            cache.pos[i] = len(p)
            seqs.append(p + [int(logits[0, -1].argmax())])
        for _ in range(6):
            logits = model(torch.tensor([[s[-1]] for s in seqs]), cache=cache.narrow(3, 16))
            for i, s in enumerate(seqs):
                s.append(int(logits[i, -1].argmax()))
        padded = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
        picked = model(padded, logits_at=torch.tensor([2, 3]))
        torch.testing.assert_close(picked[:, 0], model(padded)[[0, 1], [2, 3]])
        for s, p in zip(seqs, prompts, strict=True):
            ref = list(p)
            for _ in range(7):
                ref.append(int(model(torch.tensor([ref]))[0, -1].argmax()))
            assert s == ref


def test_api_key(slow_server):
    with pytest.raises(openai.AuthenticationError):
        slow_server.client("wrong").completions.create(model=NAME, prompt="a", max_tokens=1)
    r = requests.post(f"{slow_server.url}/v1/completions", json={"model": NAME, "prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{slow_server.url}/metrics").status_code == 401
    assert requests.get(f"{slow_server.url}/health").status_code == 200
    assert slow_server.client(KEY).completions.create(model=NAME, prompt="a", max_tokens=1).choices


def wait_until(condition, timeout: float = 2.0, errors: type[Exception] | tuple = ()) -> float:
    """Seconds until condition() held (an exception in `errors` counts as not yet); fails after timeout."""
    start = time.perf_counter()
    while True:
        try:
            if condition():
                return time.perf_counter() - start
        except errors:
            pass
        assert time.perf_counter() - start < timeout, "timed out"
        time.sleep(0.01)


def health(server: Server) -> tuple[int, int]:
    """(sequences running, sequences waiting)"""
    state = requests.get(f"{server.url}/health").json()
    return state["running"], state["queue_depth"]


@pytest.mark.slow  # a few seconds: steps take 20 ms on purpose
def test_cancelled_stream_frees_its_slot_and_full_queue_answers_429(slow_server):
    body = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 80, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{slow_server.url}/v1/completions"
    first = requests.post(url, json=body, headers=headers, stream=True, timeout=10)  # returns with the headers
    wait_until(lambda: health(slow_server) == (1, 0))
    # One slot busy, one sequence may wait, the next is turned away.
    queued = requests.post(url, json=body, headers=headers, stream=True, timeout=10)
    assert queued.status_code == 200
    wait_until(lambda: health(slow_server) == (1, 1))
    busy = requests.post(url, json=body, headers=headers, timeout=10)
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
    # A client that leaves while waiting leaves the queue; one that leaves mid-answer frees its slot, both long
    # before the 80 tokens (1.6 s) the first would take.
    queued.close()
    assert wait_until(lambda: health(slow_server) == (1, 0)) < 0.5
    first.close()
    assert wait_until(lambda: health(slow_server) == (0, 0)) < 0.5


def steer(body: dict) -> None:
    """Nudge a generated body towards one the server can serve (its model, a short conversation with known roles,
    a short non-empty prompt, few tokens, ids in the vocabulary), so that fuzzing reaches sampling and streaming
    with odd temperatures, top_p, stops and seeds."""
    body["model"] = NAME
    if isinstance(body.get("messages"), list):  # generated bodies may hold any JSON value here (True, 0, "")
        body["messages"] = body["messages"][:2]
        for i, message in enumerate(body["messages"]):
            if isinstance(message, dict):
                message["role"] = ("user", "assistant")[i % 2]
                if isinstance(message.get("content"), str):
                    message["content"] = message["content"][:20]
    for key, bound in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
        if type(body.get(key)) is int:
            body[key] = body[key] % bound + 1
    in_vocab = lambda x: x % CFG.vocab_size if type(x) is int else x  # noqa: E731
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        body["prompt"] = prompt[:40] or "a"
    elif isinstance(prompt, list):
        body["prompt"] = [[in_vocab(t) for t in x][:20] if isinstance(x, list) else in_vocab(x) for x in prompt[:20]]
    if isinstance(body.get("stop"), list):
        body["stop"] = body["stop"][:4]


@pytest.mark.slow  # schemathesis: 120 generated requests, valid and invalid, over every operation
def test_fuzzed_requests_never_get_a_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    served = []

    @given(case=st.one_of([schema.as_strategy(generation_mode=mode) for mode in modes]))
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def fuzz(case: schemathesis.Case) -> None:
        if len(served) % 2 and isinstance(case.body, dict):  # every other request as generated, every other steered
            steer(case.body)
        response = case.call(timeout=30)
        assert response.status_code < 500, (case.path, case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        served.append(case.method == "POST" and response.status_code == 200)

    fuzz()
    assert sum(served) >= 10  # generation was reached, not only validation


@pytest.mark.slow  # a second process: imports and model loading take a few seconds
def test_cli_serves_a_checkpoint(shakespeare_shards, tmp_path):
    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "nomoat.cli", "serve", str(tmp_path / "run"), "--port", str(port)]
    server = subprocess.Popen([*command, "--api-key", KEY], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: server.poll() is None and requests.get(f"{url}/health").ok, timeout=60, errors=OSError)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        assert client.models.list().data[0].id == "run"
        assert client.completions.create(model="run", prompt="ROMEO:", max_tokens=3).usage.completion_tokens <= 3
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert f"serving 'run' on http://127.0.0.1:{port}/" in err


def test_cli_serve_refuses_a_missing_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_cli_serve_reports_a_busy_port_before_loading_the_model(tmp_path, capsys):
    """A busy port is one line naming it, exit 2, before the model loads: here the model does not even exist, and
    the port is what gets reported; no 'serving' line comes first."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"nomoat: error: cannot serve on 127.0.0.1:{port}: the port is in use (another "
                                "server is on it?)"]  # fmt: skip


def test_cli_serve_name_sets_the_served_model_id(shakespeare_shards, tmp_path, monkeypatch, capsys):
    """--name is the id /v1/models lists and requests must send; without it, the folder's name."""
    cfg = tiny_run(shakespeare_shards, tmp_path / "hf")
    save_checkpoint(tmp_path / "hf", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    served = {}
    monkeypatch.setattr("nomoat.serve.app.run_server", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setattr("nomoat.serve.engine.Engine.warm_up", lambda self: 0.0)  # no compile: not what is tested
    for flags, name in [(["--name", "shakespeare-tiny"], "shakespeare-tiny"), ([], "hf")]:
        assert main(["serve", str(tmp_path / "hf"), "--port", "0", *flags]) == 0
        with running(served["app"]) as url:
            assert requests.get(f"{url}/v1/models").json()["data"][0]["id"] == name
            body = {"model": "hf", "prompt": "ROMEO:", "max_tokens": 2}
            assert requests.post(f"{url}/v1/completions", json=body).status_code == (200 if name == "hf" else 404)
    assert main(["serve", str(tmp_path / "hf"), "--port", "0", "--name", " "]) == 2
    assert "--name is empty" in capsys.readouterr().err


def test_a_non_local_host_gets_a_random_key_printed_once(tokenizer, monkeypatch, capsys):
    """Like Jupyter's token: `serve --host 0.0.0.0` with no --api-key makes a key, prints it, and requires it;
    only an explicit --no-api-key serves anyone."""
    from nomoat.checkpoint import Checkpoint
    from nomoat.config import RunConfig, TrainConfig
    from nomoat.errors import UserError
    from nomoat.serve.app import serve

    served = {}
    monkeypatch.setattr("nomoat.serve.app.run_server", lambda app, **kw: served.update(app=app, **kw))
    ckpt = Checkpoint(Path("tiny"), RunConfig(model=CFG, train=TrainConfig(seq_len=32)), tiny_model(), tokenizer, None)
    serve(ckpt, ServeConfig(host="0.0.0.0", port=0))
    err = capsys.readouterr().err
    key = err.split("this run's key is ")[1].split()[0]
    assert len(key) >= 24 and err.count(key) == 2 and served["host"] == "0.0.0.0"  # printed once (and its header)
    with running(served["app"]) as url:
        assert requests.get(f"{url}/v1/models").status_code == 401
        assert requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    serve(ckpt, ServeConfig(host="0.0.0.0", port=0, no_api_key=True))
    assert "with no key (--no-api-key)" in capsys.readouterr().err
    with running(served["app"]) as url:
        assert requests.get(f"{url}/v1/models").status_code == 200
    serve(ckpt, ServeConfig(host="127.0.0.1", port=0))
    assert "key" not in capsys.readouterr().err
    with pytest.raises(UserError, match="contradict"):
        ServeConfig(host="0.0.0.0", api_key="k", no_api_key=True)
