"""llama.cpp's own convert_hf_to_gguf.py, run on a freshly trained tiny or random model, for tests and benchmarks.

    python scripts/llamacpp_convert.py LLAMACPP_SOURCE PRE HF_DIR --outfile F.gguf --outtype f32

Three facts it cannot know about such a model are filled in: the BPE pre-tokenizer PRE (a new tokenizer's hash
is in no list of its), that there is no tokenizer.model (it would import sentencepiece to find out), and the
config keys that transformers 5's AutoConfig.to_dict() no longer keeps. Everything else is the converter's own.
"""

import runpy
import sys

src, pre = sys.argv.pop(1), sys.argv.pop(1)
sys.path[:0] = [src + "/gguf-py", src]
import conversion.base as base  # noqa: E402  (from the llama.cpp source just put on the path)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre


def no_sentencepiece(self):
    raise FileNotFoundError("no tokenizer.model")


base.TextModel._set_vocab_sentencepiece = no_sentencepiece
load_hparams = base.ModelBase.load_hparams


def with_old_keys(*args, **kwargs):
    hp = load_hparams(*args, **kwargs)
    hp.setdefault("n_ctx", hp.get("n_positions"))
    hp.setdefault("rotary_pct", (hp.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    return hp


base.ModelBase.load_hparams = staticmethod(with_old_keys)
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
