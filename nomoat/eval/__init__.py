"""Evaluation: loss, perplexity and bits per byte; zero- and few-shot tasks; the lm-evaluation-harness model.

`harness.py` imports lm_eval, so it is not imported here; `import nomoat.eval.harness` registers the model.
"""

from nomoat.eval.loss import evaluate_loss, evaluate_shards, evaluate_text
from nomoat.eval.tasks import evaluate_task, load_task

__all__ = ["evaluate_loss", "evaluate_shards", "evaluate_task", "evaluate_text", "load_task"]
