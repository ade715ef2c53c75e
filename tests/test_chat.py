"""Chat rendering equals transformers' apply_chat_template on real-world templates; assistant-only masks are
right token by token, with and without generation markers; bad conversations and templates are named."""

from __future__ import annotations

import pytest

from nomoat.chat import DEFAULT_CHAT_TEMPLATE, check_turns, encode_chat, render_chat
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer, train_tokenizer

# Published templates, copied from the models' tokenizer_config.json.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# ChatML with transformers' {% generation %} markers, so that its own assistant mask can be compared with ours.
CHATML_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML_QWEN2, "mistral": MISTRAL, "zephyr": ZEPHYR, "marked": CHATML_MARKED}
EOS_OF = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "</s>", "zephyr": "</s>", "marked": "<|im_end|>"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>"]
SPECIALS += ["<|start_header_id|>", "<|end_header_id|>"]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3? Café ☕"},
    {"role": "assistant", "content": " 6, surely.\n"},
]
NO_SYSTEM = CHAT[1:]


@pytest.fixture(scope="module")
def base_tok() -> Tokenizer:
    text = ["What is two plus two? The answer is four. Café ☕ and tea.\n"] * 20
    return train_tokenizer(text, 400, special_tokens=SPECIALS)


def with_template(tok: Tokenizer, name: str) -> Tokenizer:
    bos = "<|begin_of_text|>" if name == "llama3" else "<s>"
    return Tokenizer(tok.hf, eos_token=EOS_OF[name], chat_template=TEMPLATES[name], bos_token=bos)


def hf_tokenizer(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok.hf, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=tok.chat_template
    )


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_render_equals_apply_chat_template(base_tok: Tokenizer, name: str, generation_prompt: bool) -> None:
    tok = with_template(base_tok, name)
    hf = hf_tokenizer(tok)
    chats = [NO_SYSTEM, NO_SYSTEM[:1], NO_SYSTEM[:3]] + ([] if name == "mistral" else [CHAT, CHAT[:2]])
    for chat in chats:
        ours = render_chat(tok, chat, add_generation_prompt=generation_prompt)
        theirs = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == theirs


def test_default_template_is_chatml(base_tok: Tokenizer) -> None:
    assert base_tok.chat_template is None
    text = render_chat(base_tok, NO_SYSTEM[:1])
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    theirs = hf_tokenizer(Tokenizer(base_tok.hf, chat_template=DEFAULT_CHAT_TEMPLATE))
    assert text == theirs.apply_chat_template(NO_SYSTEM[:1], tokenize=False, add_generation_prompt=True)


def test_mask_equals_transformers_generation_mask(base_tok: Tokenizer) -> None:
    tok = with_template(base_tok, "marked")
    ids, mask = encode_chat(tok, CHAT)
    out = hf_tokenizer(tok).apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(out["input_ids"])  # the eos is the template's own <|im_end|>, so nothing was appended
    assert [int(m) for m in mask] == list(out["assistant_masks"])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_mask_token_by_token(base_tok: Tokenizer, name: str) -> None:
    """The scored tokens are exactly each reply with what closes its turn, ending in eos; the rest is prompt."""
    tok = with_template(base_tok, name)
    chat = NO_SYSTEM if name == "mistral" else CHAT
    ids, mask = encode_chat(tok, chat)
    assert len(ids) == len(mask)
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask, strict=True)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    assert len(runs) == 2
    for run, reply in zip(runs, ("4.", " 6, surely.\n"), strict=True):
        text = tok.decode(run)
        assert run.count(tok.eos_id) == 1  # the turn may close with more after eos, as ChatML's "\n"
        assert tok.decode(run[run.index(tok.eos_id) + 1 :]).strip() == ""
        body = reply.strip() if name == "llama3" else reply  # Llama 3's template trims content
        assert text.startswith(body)
        assert reply not in tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    prompt_text = tok.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "What is 2 + 2?" in prompt_text and "3 + 3" in prompt_text


def test_eos_is_appended_when_the_template_lacks_it(base_tok: Tokenizer) -> None:
    ids, mask = encode_chat(base_tok, NO_SYSTEM[:2])  # default ChatML; eos is <|endoftext|>
    scored = [t for t, m in zip(ids, mask, strict=True) if m]
    assert base_tok.decode(scored) == "4.<|im_end|>\n<|endoftext|>"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "assistant", "content": "hi"}], "message 0: role 'assistant' out of order"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: role 'user' out of order"),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        ([{"role": "user", "content": 3}], "message 0: expected"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "role 'system' out of order"),
    ],
)
def test_bad_conversations_are_named(messages: list, error: str) -> None:
    with pytest.raises(UserError, match=error):
        check_turns(messages)


def test_template_errors_are_named(base_tok: Tokenizer) -> None:
    tok = with_template(base_tok, "mistral")
    with pytest.raises(UserError, match="failed to render.*roles must alternate"):
        render_chat(tok, CHAT)  # the Mistral template refuses a system message
    broken = Tokenizer(base_tok.hf, chat_template="{% for m in messages %}{{ m.content }")
    with pytest.raises(UserError, match="does not compile"):
        render_chat(broken, NO_SYSTEM)
    with pytest.raises(UserError, match="unknown role"):
        render_chat(base_tok, [{"role": "tool", "content": "x"}])


def test_template_travels_with_the_tokenizer(base_tok: Tokenizer, tmp_path) -> None:
    import json

    tok = with_template(base_tok, "llama3")
    tok.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == LLAMA3
    back = Tokenizer.load(tmp_path)
    assert back.chat_template == LLAMA3
    (tmp_path / "chat_template.jinja").unlink()
    config = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": MISTRAL}]}
    config |= {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    back = Tokenizer.load(tmp_path / "tokenizer.json")
    assert (back.chat_template, back.bos_token, back.eos_token) == (MISTRAL, "<s>", "</s>")


def test_template_travels_through_hf_conversion(base_tok: Tokenizer, tmp_path) -> None:
    """to-hf writes what AutoTokenizer renders identically; from-hf brings the template, bos and eos back."""
    import torch
    from transformers import AutoTokenizer

    from nomoat.checkpoint import Checkpoint, load_checkpoint
    from nomoat.config import ModelConfig, RunConfig, TrainConfig
    from nomoat.convert import from_hf, to_hf
    from nomoat.model import Transformer

    cfg = ModelConfig(vocab_size=base_tok.vocab_size, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16,
                      norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False)  # fmt: skip
    tok = with_template(base_tok, "llama3")
    torch.manual_seed(0)
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=16))
    hf_dir = to_hf(Checkpoint(tmp_path, run, Transformer(cfg), tok, None), tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert theirs == render_chat(tok, CHAT)
    back = load_checkpoint(from_hf(hf_dir, tmp_path / "ckpt")).tokenizer
    assert (back.chat_template, back.bos_token, back.eos_token) == (LLAMA3, "<|begin_of_text|>", "<|eot_id|>")
