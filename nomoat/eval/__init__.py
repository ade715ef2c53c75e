"""Evaluation: held-out loss and bits per byte."""

from nomoat.eval.loss import evaluate_loss

__all__ = ["evaluate_loss"]
