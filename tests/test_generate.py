"""Generation: greedy equals argmax of full forwards, sampling filters, seeds, stops, streaming text."""

import pytest
import torch

from nomoat.config import ModelConfig
from nomoat.errors import UserError
from nomoat.generate import generate_text, generate_tokens, sample_next
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer

CFG = ModelConfig(vocab_size=300, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=40, pos_emb="rope")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = [5, 17, 42]
    out = list(generate_tokens(model, prompt, max_new_tokens=10, temperature=0))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


@pytest.mark.slow  # Inductor compiles the step: seconds on 2 cores
@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_compiled_decoding_equals_eager(pos_emb):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**vars(CFG), "pos_emb": pos_emb}))
    prompt = [5, 17, 42]
    eager = list(generate_tokens(model, prompt, max_new_tokens=12, temperature=0))
    assert list(generate_tokens(model, prompt, max_new_tokens=12, temperature=0, compile=True)) == eager
    sampled = list(generate_tokens(model, prompt, max_new_tokens=12, seed=1))
    assert list(generate_tokens(model, prompt, max_new_tokens=12, seed=1, compile=True)) == sampled


def test_seed_makes_sampling_repeatable(model):
    a = list(generate_tokens(model, [1, 2], max_new_tokens=15, temperature=1.0, seed=3))
    b = list(generate_tokens(model, [1, 2], max_new_tokens=15, temperature=1.0, seed=3))
    c = list(generate_tokens(model, [1, 2], max_new_tokens=15, temperature=1.0, seed=4))
    assert a == b and a != c


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert {sample_next(logits, 1.0, top_p=0.8, generator=g) for _ in range(200)} == {0, 1}
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(50)} == {0}
    assert sample_next(logits, 0.0) == 0


def test_stops_at_eos_and_at_full_context(model):
    sampled = list(generate_tokens(model, [7], max_new_tokens=20, seed=0))
    k = next(i for i, t in enumerate(sampled) if i > 0 and t not in sampled[:i])  # first fresh token
    stopped = list(generate_tokens(model, [7], max_new_tokens=20, seed=0, eos_id=sampled[k]))
    assert stopped == sampled[:k]
    stats: dict[str, float] = {}
    assert len(list(generate_tokens(model, list(range(30)), max_new_tokens=100, temperature=0, stats=stats))) == 10
    assert stats["finish"] == "context"  # said, so that a command can tell the user why it stopped short
    for max_new, eos, finish in [(10, None, "length"), (20, sampled[k], "eos")]:
        stats = {}
        list(generate_tokens(model, [7], max_new_tokens=max_new, seed=0, eos_id=eos, stats=stats))
        assert stats["finish"] == finish
    with pytest.raises(UserError, match="context is 40"):
        list(generate_tokens(model, list(range(40)), max_new_tokens=1))
    with pytest.raises(UserError, match="empty"):
        list(generate_tokens(model, [], max_new_tokens=1))
    with pytest.raises(UserError, match="max_new_tokens must be 0 or more, got -3"):
        list(generate_tokens(model, [1], max_new_tokens=-3))


def test_text_streams_and_matches_one_shot_decode(model):
    tok = train_tokenizer(["To be, or not to be, that is the question. " * 20], vocab_size=300)
    pieces = list(generate_text(model, tok, "To be", max_new_tokens=20, temperature=0))
    ids = list(generate_tokens(model, tok.encode("To be"), max_new_tokens=20, temperature=0, eos_id=tok.eos_id))
    assert "".join(pieces) == tok.decode(ids)


def test_extreme_sampling_settings_stay_finite():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0 - 1e-3])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1e-30, generator=g) == 1
    assert sample_next(logits, temperature=1e-4, generator=g) in (1, 3)
    assert sample_next(logits, temperature=1.0, top_p=1e-300, generator=g) == 1


def test_one_compile_serves_every_block_cache_length_and_batch():
    """The compiled step is one block's graph and the head's: a 4-layer model, prompts of new lengths and a
    batched cache compile nothing more after the first step of each batch kind (1 and many rows)."""
    from torch._dynamo.utils import counters

    from nomoat.generate import decode_step
    from nomoat.model import KVCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**vars(CFG), "n_layer": 4, "d_model": 48, "n_head": 3})).eval()
    eager = {n: list(generate_tokens(model, list(range(1, n)), max_new_tokens=8, temperature=0)) for n in (3, 9, 20)}
    before = counters["stats"]["unique_graphs"]
    for n, tokens in eager.items():
        assert list(generate_tokens(model, list(range(1, n)), max_new_tokens=8, temperature=0, compile=True)) == tokens
    assert counters["stats"]["unique_graphs"] - before == 2
    step = decode_step(model)
    for rows, length in ((3, 16), (5, 30)):
        ids = torch.randint(0, CFG.vocab_size, (rows, 5))
        caches = [KVCache(model.cfg, rows, length) for _ in range(2)]
        with torch.no_grad():
            for cache in caches:
                model(ids[:, :4], cache=cache)
            torch.testing.assert_close(step(ids[:, 4:], caches[0]), model(ids[:, 4:], cache=caches[1]))
    assert counters["stats"]["unique_graphs"] - before == 4


def test_short_requests_decode_eagerly_unless_compiled_already(model):
    from nomoat.generate import _STEPS, AUTO_COMPILE_TOKENS

    torch.manual_seed(0)
    fresh = Transformer(CFG).eval()
    list(generate_tokens(fresh, [1, 2], max_new_tokens=AUTO_COMPILE_TOKENS - 1, temperature=0))
    assert fresh not in _STEPS
    list(generate_tokens(fresh, [1, 2], max_new_tokens=AUTO_COMPILE_TOKENS, temperature=0))
    assert fresh in _STEPS
