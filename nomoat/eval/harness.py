"""nomoat models inside EleutherAI's lm-evaluation-harness: the `nomoat` model type, and a CLI that knows it.

lm-eval 0.4 finds models only in its own registry (no entry points), so the `lm_eval` command alone cannot see
ours. Importing this module registers it; `python -m nomoat.eval.harness ARGS` is `lm_eval ARGS` after that import:

    python -m nomoat.eval.harness --model nomoat --model_args pretrained=runs/a --tasks hellaswag

`pretrained` is any MODEL nomoat loads (load.py); `adapter=FOLDER` applies a LoRA adapter to it.
In Python, `import nomoat.eval.harness` before `lm_eval.simple_evaluate(model="nomoat", ...)` does the same.
Scoring is `lm.py`'s, so the harness and `nomoat eval --task` give the same numbers.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from nomoat.eval.lm import document_nll, score_requests
from nomoat.generate import generate_tokens
from nomoat.load import load_model
from nomoat.tokenizer import decode_stream


@register_model("nomoat")
class NomoatLM(TemplateLM):
    """Any MODEL nomoat loads (checkpoint, run folder or Hugging Face folder), for every harness task."""

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        batch_size: int | str = 4,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        adapter: str | None = None,
        **_: Any,  # the harness passes its own settings (e.g. trust_remote_code); nomoat needs none of them
    ) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness CLI asks for cuda
            warnings.warn(f"device {device} is not available; using cpu", stacklevel=2)
            device = "cpu"
        ckpt = load_model(pretrained, adapter=adapter, device=device)
        self.model, self.tokenizer = ckpt.model.eval(), ckpt.tokenizer
        self.window = int(max_length or self.model.cfg.max_seq_len)
        self.rolling_batch = int(batch_size) if str(batch_size).isdigit() else 4
        self.max_gen_toks = int(max_gen_toks)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"{pretrained}: the tokenizer has no end-of-text token")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        return score_requests(self.model, [(ctx, cont) for _, ctx, cont in requests], self.window)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm):
            tokens = self.tok_encode(text)
            nats, _ = document_nll(self.model, tokens, self.eot_token_id, self.window, self.window, self.rolling_batch)
            out.append(-nats)
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        eos = self.tokenizer.eos_token
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            out.append(self.generate(context, until, kwargs["max_gen_toks"], kwargs.get("temperature", 0.0)))
        return out

    def generate(self, context: str, until: list[str], max_gen_toks: int, temperature: float = 0.0) -> str:
        """Decode after context until any stop string appears (cut there) or max_gen_toks; greedy by default."""
        prompt = self.tok_encode(context)[-max(1, self.window - max_gen_toks) :] or [self.eot_token_id]
        tokens = generate_tokens(
            self.model, prompt, max_gen_toks, temperature=temperature, seed=1234, eos_id=self.eot_token_id
        )
        return "".join(decode_stream(self.tokenizer, tokens, until))


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the nomoat model type registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
