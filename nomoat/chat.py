"""Chat rendering: a model's Jinja chat template rendered as transformers' apply_chat_template does, and the
token ids of a conversation with the assistant's tokens marked for the loss, and a reply streamed as it is made.

Masks are found without `{% generation %}` markers: each assistant turn is where the conversation rendered up to
and including that turn departs from the one rendered up to its generation prompt. Not here: datasets, batching
and packing (finetune.py), sampling itself (generate.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer, decode_stream

ROLES = ("system", "user", "assistant")

# ChatML (as Qwen2 uses, without its default system prompt): the documented default for tokenizers with no
# template of their own. Its markers need not be special tokens; they then encode as ordinary text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps, as transformers gives them.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """The environment transformers renders templates in: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, and the same globals. The {% generation %} tag is accepted and renders its body unchanged."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not compile: {e.message} (template line {e.lineno})") from None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) as a no-op block."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def template_of(tokenizer: Tokenizer) -> str:
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def check_roles(messages: Sequence[dict[str, str]]) -> None:
    """Every message a dict with a known role and string content; raises naming the first that is not."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"message {i}: expected {{'role': ..., 'content': <string>}}, got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise UserError(f"message {i}: unknown role {m.get('role')!r} (known: {', '.join(ROLES)})")


def check_turns(messages: Sequence[dict[str, str]]) -> None:
    """The order a training conversation must have: an optional system message first, then user and assistant
    turns alternating from a user turn, with at least one assistant turn."""
    check_roles(messages)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        m, want = messages[i], ("user", "assistant")[(i - first) % 2]
        if m["role"] != want:
            after = f"after {messages[i - 1]['role']!r}" if i else "first"
            raise UserError(f"message {i}: role {m['role']!r} out of order ({after}; expected {want!r})")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the conversation has no assistant turn to learn from")


def _render(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    template = _compile(template_of(tokenizer))
    # transformers passes the tokenizer's special tokens as variables; those it lacks stay undefined.
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    try:
        return template.render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in special.items() if v is not None},
        )
    except Exception as e:  # a template is code: any error inside it is the template's, named as such
        raise UserError(f"the chat template failed to render: {type(e).__name__}: {e}") from None


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as the model's template writes it (DEFAULT_CHAT_TEMPLATE when it has none), equal to
    transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`."""
    check_roles(messages)
    return _render(tokenizer, messages, add_generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = next((i for i in range(n) if a[i] != b[i]), n)
    return i


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn's span runs from where the render up to its generation prompt departs from the render up to and
    including the turn, to the end of the latter: the reply plus whatever closes it (`<|im_end|>`, `</s>`).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        start, end = _common_prefix(before, upto), len(upto)
        if not full.startswith(upto) or (spans and start < spans[-1][1]):
            raise UserError(
                f"message {i}: the chat template renders earlier turns differently once later ones follow, "
                "so the assistant's tokens cannot be located"
            )
        if start < end:
            spans.append((start, end))
    return full, spans


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of a training conversation and, per token, whether the loss covers it (assistant turns only).

    Each piece of text between span edges is encoded on its own, as at inference the prompt is encoded and the
    reply generated. Every assistant turn ends with the eos token: appended when the template's turn lacks it,
    so that the tuned model stops.
    """
    check_turns(messages)
    text, spans = assistant_spans(tokenizer, messages)
    eos = tokenizer.eos_id
    if eos is None:
        raise UserError("the tokenizer has no eos token, so a tuned model could not learn to stop")
    ids: list[int] = []
    mask: list[bool] = []
    pos = 0
    for start, end in spans:
        prompt = tokenizer.encode(text[pos:start])
        reply = tokenizer.encode(text[start:end])
        if eos not in reply:
            reply.append(eos)
        ids += prompt + reply
        mask += [False] * len(prompt) + [True] * len(reply)
        pos = end
    tail = tokenizer.encode(text[pos:])
    return ids + tail, mask + [False] * len(tail)


def turn_closer(tokenizer: Tokenizer) -> str:
    """What the template writes after an assistant's reply, eos aside (ChatML's "<|im_end|>"; often nothing)."""
    probe = "PROBE"
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}]
    text, spans = assistant_spans(tokenizer, chat)
    reply = text[spans[0][0] : spans[0][1]] if spans else ""
    closer = reply[reply.find(probe) + len(probe) :] if probe in reply else ""
    return closer.replace(tokenizer.eos_token or "\0", "").strip()


def stream_reply(
    model: Any, tokenizer: Tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 512, **sampling: Any
) -> Iterator[str]:
    """The assistant's next reply as text pieces, generated from the rendered conversation. Stops at eos or at
    the template's turn closer, which is not shown; sampling as for generate.generate_tokens."""
    from nomoat.generate import generate_tokens  # the model's code loads only when a reply is wanted

    prompt = tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt=True))
    tokens = generate_tokens(model, prompt, max_new_tokens, eos_id=tokenizer.eos_id, **sampling)
    yield from decode_stream(tokenizer, tokens, [turn_closer(tokenizer)])
