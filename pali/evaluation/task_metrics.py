"""Which metrics score which task: a table of task-name patterns -> task family.

The tasks in `tasks/` are registered by the data pipeline; rather than editing each
registration, the evaluator looks the family up here by the task's name (first matching
pattern wins). A task registered with its own seqio `metric_fns` keeps them (and its
`postprocess_fn`): the table is only the default.

| family    | patterns (regex on the task name) | metrics                                  |
|-----------|-----------------------------------|------------------------------------------|
| detection | detect, detection, _det           | COCO mAP, AP50, AP75 from `<loc>` strings |
| ocr       | ocr                               | exact_match, cer, anls                   |
| vqa       | vqa, answer, question, count      | vqa_accuracy                             |
| caption   | caption, captioning               | cider, bleu4                             |
| denoise   | ul2, denois, span, corrupt, lm    | token_accuracy, sequence_accuracy (ids)  |

Every task also gets the teacher-forced `loss` and `accuracy` from the evaluator. Add
patterns from gin: `task_family.extra_patterns = [('my_task', 'vqa')]` (checked first).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import gin
import numpy as np

from pali.evaluation import metrics

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict]

DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"detect|detection|_det(_|$)", "detection"),
    (r"ocr", "ocr"),
    (r"vqa|answer|question|count", "vqa"),
    (r"caption", "caption"),
    (r"ul2|denois|span|corrupt|(^|_)lm(_|$)|prefix", "denoise"),
)


def _strip(text: str) -> str:
  return " ".join(str(text).split())


def _detection_fn(targets, predictions):
  return metrics.coco_detection_metrics(targets, predictions)


@dataclasses.dataclass(frozen=True)
class TaskMetrics:
  """How to score one task.

  `metric_fns` have seqio's signature `fn(targets, predictions) -> {name: float}`;
  `postprocess_fn(text, is_target)` turns a detokenized string into what they take.
  `inputs`: 'text' (postprocessed strings), 'text_and_score' (predictions are
  (text, probability) pairs, for detection AP: one probability per object where
  `object_scores` gives them, else the sequence's for all) or 'ids' (token-id lists, for UL2
  targets whose sentinels and spans are clearer as ids).
  """
  family: str
  metric_fns: tuple[MetricFn, ...]
  postprocess_fn: Callable[..., Any] = lambda text, is_target=False: _strip(text)
  inputs: str = "text"

  def compute(self, *, targets: Sequence[str], predictions: Sequence[str],
              scores: Sequence[float], target_ids: Sequence[Sequence[int]],
              prediction_ids: Sequence[Sequence[int]],
              object_scores: Optional[Sequence[Optional[Sequence[float]]]] = None
              ) -> dict[str, float]:
    """All metrics of this task on aligned examples (scores are summed log-probs;
    `object_scores`, per example a probability per parsed object or None, from `box_scores`)."""
    if self.inputs == "ids":
      tgt, pred = list(target_ids), list(prediction_ids)
    else:
      tgt = [self.postprocess_fn(t, is_target=True) for t in targets]
      pred = [self.postprocess_fn(p, is_target=False) for p in predictions]
      if self.inputs == "text_and_score":
        per_object = object_scores if object_scores is not None else [None] * len(pred)
        pred = [(p, float(np.exp(s)) if o is None else list(o))
                for p, s, o in zip(pred, scores, per_object)]
    out: dict[str, float] = {}
    for fn in self.metric_fns:
      out.update({k: float(v) for k, v in fn(tgt, pred).items()})
    return out


FAMILIES: dict[str, TaskMetrics] = {
    "caption": TaskMetrics("caption", (metrics.caption_metrics,)),
    "vqa": TaskMetrics("vqa", (metrics.vqa_accuracy,)),
    "ocr": TaskMetrics("ocr", (metrics.ocr_metrics,)),
    "detection": TaskMetrics("detection", (_detection_fn,), inputs="text_and_score"),
    "denoise": TaskMetrics("denoise", (metrics.token_accuracy, metrics.sequence_accuracy),
                           inputs="ids"),
    # Unknown tasks: still compared as strings, so something meaningful is always reported.
    "other": TaskMetrics("other", (metrics.exact_match,)),
}


@gin.configurable
def task_family(task_name: str, extra_patterns: Sequence[tuple[str, str]] = ()) -> str:
  """The family of `task_name` ('other' when no pattern matches)."""
  for pattern, family in tuple(extra_patterns) + DEFAULT_PATTERNS:
    if family not in FAMILIES:
      raise ValueError(f"task_family.extra_patterns: unknown family {family!r} for pattern "
                       f"{pattern!r}; families are {sorted(FAMILIES)}.")
    if re.search(pattern, task_name):
      return family
  return "other"


def _seqio_postprocess(task) -> Callable[..., Any]:
  def post(text, is_target=False):
    return task.postprocess_fn(_strip(text), example={}, is_target=is_target)
  return post


def for_task(task_name: str, task: Optional[Any] = None) -> TaskMetrics:
  """The metrics of a task: its own seqio `metric_fns` if registered with some (those that
  take (targets, predictions)), else the family default from the name."""
  own = [fn for fn in (getattr(task, "predict_metric_fns", None) or []) if fn is not None]
  if own:
    post = (_seqio_postprocess(task) if getattr(task, "postprocess_fn", None) is not None
            else FAMILIES["other"].postprocess_fn)
    return TaskMetrics("task", tuple(own), postprocess_fn=post)
  return FAMILIES[task_family(task_name)]
