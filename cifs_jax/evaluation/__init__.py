"""Robust-accuracy evaluation: protocols, the batched evaluator, reports.

from cifs_jax import evaluation
results = evaluation.evaluate({"stop": stop_fn, "full": full_fn},
                              batches, evaluation.strong_protocol(), key)
evaluation.publish(results, workdir, "eval_strong")
"""

from cifs_jax.evaluation.evaluator import evaluate
from cifs_jax.evaluation.evaluator import PartialResults
from cifs_jax.evaluation.evaluator import protocol_runs
from cifs_jax.evaluation.evaluator import Run
from cifs_jax.evaluation.protocols import adaptive_targets
from cifs_jax.evaluation.protocols import Attack
from cifs_jax.evaluation.protocols import autoattack_protocol
from cifs_jax.evaluation.protocols import ComponentAttack
from cifs_jax.evaluation.protocols import GradientAttack
from cifs_jax.evaluation.protocols import paper_protocol
from cifs_jax.evaluation.protocols import Protocol
from cifs_jax.evaluation.protocols import PROTOCOLS
from cifs_jax.evaluation.protocols import strong_protocol
from cifs_jax.evaluation.report import console_summary
from cifs_jax.evaluation.report import publish
from cifs_jax.evaluation.report import to_markdown
from cifs_jax.evaluation.report import write_json
from cifs_jax.evaluation.report import write_markdown

__all__ = [
  "Attack",
  "ComponentAttack",
  "GradientAttack",
  "PROTOCOLS",
  "PartialResults",
  "Protocol",
  "Run",
  "adaptive_targets",
  "autoattack_protocol",
  "console_summary",
  "evaluate",
  "paper_protocol",
  "protocol_runs",
  "publish",
  "strong_protocol",
  "to_markdown",
  "write_json",
  "write_markdown",
]
