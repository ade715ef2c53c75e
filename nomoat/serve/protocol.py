"""OpenAI's wire format: the request models, the response bodies and server-sent-event chunks of completions and
chat completions, usage, and the error body `{"error": {"message", "type", "param", "code"}}`.

Plain data in, plain dicts out: no HTTP framework, engine or tokenizer here. Checking a request against the model
served, and sending the answer, are app.py's.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # n times the number of prompts
MAX_STOPS = 4
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
    logprobs: int | None = None  # declared only to refuse them (app.py's unsupported())
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def sse(data: dict[str, Any]) -> str:
    """One server-sent event; a stream ends with DONE."""
    return f"data: {json.dumps(data)}\n\n"


DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Reply:
    """How one request is answered: as a completion or a chat completion, whole or chunk by chunk. Every chunk
    and the whole body share the request's id and creation time."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, model: str, chat: bool) -> Reply:
        return cls(chat, model, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()))

    def _head(self, whole: bool) -> dict[str, Any]:
        kind = ("chat.completion" if whole else "chat.completion.chunk") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, i: int, content: dict[str, Any], reason: str | None) -> dict[str, Any]:
        choice = {"index": i, **content, "logprobs": None, "finish_reason": reason}
        return {**self._head(whole=False), "choices": [choice]}

    def opening(self, choices: int) -> list[dict[str, Any]]:
        """The chunks a stream starts with: chat announces the assistant's role in each choice."""
        if not self.chat:
            return []
        return [self._chunk(i, {"delta": {"role": "assistant", "content": ""}}, None) for i in range(choices)]

    def chunk(self, i: int, text: str, reason: str | None) -> dict[str, Any]:
        """New text for choice i, or its finish_reason (with text "")."""
        content = {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
        return self._chunk(i, content, reason)

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The last chunk before DONE when the client asked for usage (stream_options.include_usage)."""
        return {**self._head(whole=False), "choices": [], "usage": counts}

    def whole(self, texts: list[str], reasons: list[str | None], counts: dict[str, int]) -> dict[str, Any]:
        """The one body of a request that does not stream."""
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            answer = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": i, **answer, "logprobs": None, "finish_reason": reason})
        return {**self._head(whole=True), "choices": choices, "usage": counts}
