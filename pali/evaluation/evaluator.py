"""Batch evaluation of parameters on a seqio task or a whole mixture.

For every task: the eval split in a fixed order (`shuffle=False`, one epoch), every example
up to `EvalSettings.max_eval_examples` exactly once (the last batch is padded with zero rows,
which carry zero loss weight and are dropped before scoring; see `eval_input`); decode
(`pali.decoding.decode_batch`, jitted once per shape), detokenize with the task's vocabulary,
postprocess and score (`pali.evaluation.task_metrics`); teacher-forced loss and token accuracy
(`pali.training.step.make_eval_step`). Outputs under `MODEL_DIR/eval/<task>/`: TensorBoard
scalars (tags = metric names, plus `loss`, `accuracy`, `num_examples`), an image summary
`predictions` (boxes drawn, texts written) and `predictions_<step>.jsonl` (input, target,
prediction, score).

Multi-host: each host reads and decodes its own shard (`shard_id = process_index`); every host
runs the same number of steps (a host whose shard ran out decodes zero rows); the token arrays
(inputs, targets, predictions, scores, positions) of every batch are gathered to all hosts
with `multihost_utils.process_allgather`, and process 0 alone detokenizes, scores and writes.

Checkpoint discovery lives in `checkpoint_io` (its names are re-exported here).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from pali import checkpoints, decoding, partitioning
from pali.evaluation import box_scores, eval_input, task_metrics, visualize
from pali.evaluation.checkpoint_io import (abstract_params, checkpoint_steps,  # noqa: F401
                                           model_dir_for, resolve_checkpoint_path)
from pali.training import step as step_lib

DECODE_FEATURES = ("images", "image_mask", "encoder_input_tokens")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How to evaluate (gin: `EvalSettings.max_eval_examples = 256`, ...).

  batch_size: global examples per decoding batch, rounded up to a multiple of the
    data-parallel size and the number of hosts.
  decode_method: 'greedy' | 'beam' (beam_size, beam_alpha) | 'sample' (temperature, top_k,
    top_p, seed).
  max_decode_len: defaults to the target length.
  allowed_outputs: {task-name regex: [allowed output strings]}: closed-set tasks decode
    under a prefix trie of those strings (e.g. counting answers).
  num_images: how many predictions per task are drawn for TensorBoard.
  per_box_scores: detection AP ranks each box by the probability of its own tokens (locations
    and label; `box_scores`), not by its whole sequence's (False: the sequence's).
  """
  max_eval_examples: int = 64
  batch_size: int = 16
  split: str = "validation"
  decode_method: str = "greedy"
  beam_size: int = 4
  beam_alpha: float = 0.6
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_decode_len: Optional[int] = None
  allowed_outputs: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  num_images: int = 4
  image_display_size: int = 192
  per_box_scores: bool = True


def _is_lead() -> bool:
  return jax.process_index() == 0


def _task_names(mixture_or_task: str) -> list[str]:
  import seqio
  from pali.data import pipeline
  provider = pipeline._lookup(mixture_or_task)  # noqa: SLF001 (registers `tasks` if needed)
  if isinstance(provider, seqio.Mixture):
    return [t.name for t in provider.tasks]
  return [provider.name]


def _strip_ids(ids: np.ndarray) -> list[int]:
  """Token ids up to (excluding) the first EOS, without padding."""
  out = []
  for t in np.asarray(ids).tolist():
    if t == decoding.EOS_ID:
      break
    if t != decoding.PAD_ID:
      out.append(int(t))
  return out


@functools.lru_cache(maxsize=8)
def _jitted_decode(model, max_decode_len, method, beam_size, alpha, temperature, top_k, top_p):
  """`decode(params, batch, trie, rng) -> (tokens [B, L], scores [B])`, jitted (the best
  beam for beam search)."""

  def decode(params, batch, trie, rng):
    kwargs: dict[str, Any] = {"trie": trie}
    if method == "beam":
      kwargs.update(beam_size=beam_size, alpha=alpha)
    elif method == "sample":
      kwargs.update(rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, scores = decoding.decode_batch(model, params, batch, max_decode_len=max_decode_len,
                                           method=method, **kwargs)
    if method == "beam":
      tokens, scores = tokens[:, 0], scores[:, 0]
    return tokens, scores

  return jax.jit(decode)


@functools.lru_cache(maxsize=8)
def _jitted_token_log_probs(model):
  return jax.jit(box_scores.make_token_log_probs(model))


@functools.lru_cache(maxsize=8)
def _jitted_loss(model, mesh):
  return jax.jit(step_lib.make_eval_step(model), out_shardings=partitioning.replicated(mesh))


class Evaluator:
  """Evaluates parameters (sharded on `mesh`) of `model`; reuse it to keep its compilations."""

  def __init__(self, model: nn.Module, *, mesh, rules=None,
               task_feature_lengths: Mapping[str, int], image_size: int, max_images: int = 1,
               settings: Optional[EvalSettings] = None):
    self.model, self.mesh = model, mesh
    self.rules = rules or partitioning.logical_axis_rules()
    self.settings = s = settings or EvalSettings()
    self.task_feature_lengths = dict(task_feature_lengths)
    self.image_size, self.max_images = image_size, max_images
    multiple = math.lcm(partitioning.data_parallel_size(mesh, self.rules), jax.process_count())
    self.global_batch = -(-s.batch_size // multiple) * multiple
    self.host_batch = self.global_batch // jax.process_count()
    self.max_decode_len = s.max_decode_len or self.task_feature_lengths["targets"]
    # Shared by every Evaluator of this process (in-training eval, continuous eval, tests):
    # a new Evaluator with the same model and decoding options does not compile again.
    self._decode = _jitted_decode(model, self.max_decode_len, s.decode_method, s.beam_size,
                                  s.beam_alpha, s.temperature, s.top_k, s.top_p)
    self._loss = _jitted_loss(model, mesh)
    self._token_log_probs = _jitted_token_log_probs(model)
    self._writers: dict[str, Any] = {}
    self._tries: dict[str, Optional[decoding.Trie]] = {}
    self.pictures: dict[str, list[np.ndarray]] = {}  # task -> drawn predictions (process 0)

  def _trie_for(self, task_name: str, vocab) -> Optional[decoding.Trie]:
    import re
    if task_name not in self._tries:
      trie = None
      for pattern, outputs in self.settings.allowed_outputs.items():
        if re.search(pattern, task_name):
          trie = decoding.build_trie([vocab.encode(o) for o in outputs])
          break
      self._tries[task_name] = trie
    return self._tries[task_name]

  # ---- one task --------------------------------------------------------------------------
  def _local_examples(self, task_name: str):
    """This host's shard, one example per element (batch_size=1 drops nothing)."""
    from pali.data import pipeline
    return pipeline.get_dataset(
        task_name, split=self.settings.split, task_feature_lengths=self.task_feature_lengths,
        batch_size=1, image_size=self.image_size, max_images=self.max_images,
        shuffle=False, seed=0, shard_id=jax.process_index(), num_shards=jax.process_count(),
        num_epochs=1)

  def evaluate_task(self, params, task_name: str) -> tuple[dict, list[dict], list[np.ndarray]]:
    """Returns (metrics, examples, images of the first examples) on every host; metrics and
    examples are complete on process 0 only (other hosts get empty ones)."""
    import seqio
    s = self.settings
    task = seqio.get_mixture_or_task(task_name)
    vocab = task.output_features["targets"].vocabulary
    trie = self._trie_for(task_name, vocab)
    rng = jax.random.PRNGKey(s.seed)
    scorer = task_metrics.for_task(task_name, task)
    per_box = s.per_box_scores and scorer.family == "detection"
    gathered, images, sums, seen = [], [], None, 0
    t0 = time.time()
    for step, (local, positions) in enumerate(eval_input.eval_batches(
        self._local_examples(task_name), host_batch=self.host_batch,
        max_examples=s.max_eval_examples)):
      batch = partitioning.host_batch_to_global(dict(local, position=positions), self.mesh,
                                                self.rules)
      position = batch.pop("position")  # sharded like the rows it numbers
      # A fresh key per global batch: sampled decodes of different batches are independent.
      decode_inputs = {k: batch[k] for k in DECODE_FEATURES}
      tokens, scores = self._decode(params, decode_inputs, trie, jax.random.fold_in(rng, step))
      batch_sums = jax.device_get(self._loss(params, batch))
      sums = batch_sums if sums is None else jax.tree_util.tree_map(np.add, sums, batch_sums)
      arrays = {"inputs": batch["encoder_input_tokens"], "targets": batch["decoder_target_tokens"],
                "predictions": tokens, "scores": scores, "position": position}
      if per_box:
        arrays["token_log_probs"] = self._token_log_probs(params, decode_inputs, tokens)
      out = multihost_utils.process_allgather(arrays, tiled=True)
      gathered.append(out)
      if seen < s.num_images:  # positions of this step start at `seen`
        imgs = multihost_utils.process_allgather(batch["images"], tiled=True)
        first = np.flatnonzero((out["position"] >= 0) & (out["position"] < s.num_images))
        images.extend(imgs[first[np.argsort(out["position"][first])], 0])
      seen += int((out["position"] >= 0).sum())
    decode_s = time.time() - t0
    if not gathered:
      logging.warning("Task %s has no example in split %r: skipped.", task_name, s.split)
      return {}, [], []
    if not _is_lead():
      return {}, [], images
    cat = {k: np.concatenate([g[k] for g in gathered]) for k in gathered[0]}
    kept = np.flatnonzero(cat["position"] >= 0)
    order = kept[np.argsort(cat["position"][kept], kind="stable")]
    cat = {k: v[order] for k, v in cat.items()}
    ids = {k: [_strip_ids(row) for row in cat[k]] for k in ("inputs", "targets", "predictions")}
    texts = {k: [vocab.decode(row) for row in v] for k, v in ids.items()}
    object_scores = None
    if per_box:
      object_scores = [box_scores.object_scores(row, lp, vocab)
                       for row, lp in zip(ids["predictions"], cat["token_log_probs"])]
    result = scorer.compute(targets=texts["targets"], predictions=texts["predictions"],
                            scores=cat["scores"].tolist(), target_ids=ids["targets"],
                            prediction_ids=ids["predictions"], object_scores=object_scores)
    weight = max(float(sums["weight_sum"]), 1e-8)
    result.update(loss=float(sums["loss"]) / weight, accuracy=float(sums["correct"]) / weight,
                  num_examples=float(len(ids["targets"])), decode_seconds=decode_s)
    examples = [{"input": i, "target": t, "prediction": p, "score": float(sc)}
                for i, t, p, sc in zip(texts["inputs"], texts["targets"], texts["predictions"],
                                       cat["scores"])]
    return result, examples, images

  # ---- a task or a mixture ---------------------------------------------------------------
  def evaluate(self, params, *, mixture_or_task: str, step: int,
               model_dir: Optional[str] = None) -> dict[str, dict[str, float]]:
    """{task: metrics} (complete on process 0); writes TensorBoard / JSONL when model_dir."""
    results = {}
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for name in _task_names(mixture_or_task):
        metrics, examples, images = self.evaluate_task(params, name)
        if not metrics and _is_lead():
          continue
        results[name] = metrics
        if _is_lead():
          self.pictures[name] = [
              visualize.draw_prediction(img, prediction=e["prediction"], target=e["target"],
                                        input_text=e["input"],
                                        size=self.settings.image_display_size)
              for img, e in zip(images, examples)]
        if model_dir and _is_lead():
          self._write(model_dir, name, step, metrics, examples, self.pictures[name])
        if _is_lead():
          logging.info("eval step %d %s: %s", step, name,
                       ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return results

  def _write(self, model_dir, task_name, step, metrics, examples, pictures) -> None:
    import tensorflow as tf
    out_dir = os.path.join(model_dir, "eval", task_name)
    tf.io.gfile.makedirs(out_dir)
    if task_name not in self._writers:
      self._writers[task_name] = metric_writers.create_default_writer(
          out_dir, just_logging=not _is_lead(), asynchronous=False)
    writer = self._writers[task_name]
    writer.write_scalars(step, metrics)
    if pictures:
      writer.write_images(step, {"predictions": np.stack(pictures)})
    writer.flush()
    with tf.io.gfile.GFile(os.path.join(out_dir, f"predictions_{step}.jsonl"), "w") as f:
      for e in examples:
        f.write(json.dumps(e) + "\n")

  def close(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers.clear()


# ---- report (the quickstart's last step) ---------------------------------------------------------
def _gin_value(name: str, default=None):
  """A train.* binding with its macros resolved (None when unbound)."""
  def resolve(v):
    if isinstance(v, gin.config.ConfigurableReference) and v.evaluate:
      return resolve(v.scoped_configurable_fn())
    if isinstance(v, dict):
      return {k: resolve(x) for k, x in v.items()}
    return v
  try:
    return resolve(gin.query_parameter(name))
  except ValueError:
    return default


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """A plain-text table: one row per task, its metrics (loss first)."""
  lines = [f"{'task':<36} metrics", "-" * 100]
  for task, m in results.items():
    keys = ["loss", "accuracy"] + sorted(
        k for k in m if k not in ("loss", "accuracy", "num_examples", "decode_seconds"))
    cells = "  ".join(f"{k}={m[k]:.3f}" for k in keys if k in m)
    lines.append(f"{task:<36} {cells}  (n={int(m.get('num_examples', 0))})")
  return "\n".join(lines)


def evaluate_and_report(model_dir: str, *, mixture_or_task: Optional[str] = None,
                        step: Optional[int] = None, params=None, model=None, mesh=None,
                        task_feature_lengths: Optional[Mapping[str, int]] = None,
                        image_size: Optional[int] = None, max_images: Optional[int] = None,
                        settings: Optional[EvalSettings] = None,
                        picture_path: Optional[str] = None) -> dict:
  """Evaluates a run (the given params, or the latest checkpoint in model_dir/checkpoints),
  prints a table of per-task metrics and saves a picture of predictions (default
  `model_dir/eval/predictions.png`). Unset arguments come from the gin `train.*` bindings.
  Returns {task: metrics}."""
  from pali.models import pali as pali_model
  mixture_or_task = mixture_or_task or _gin_value("train.mixture")
  task_feature_lengths = task_feature_lengths or _gin_value("train.task_feature_lengths")
  image_size = image_size or _gin_value("train.image_size", 224)
  max_images = max_images or _gin_value("train.max_images", 1)
  if not mixture_or_task or not task_feature_lengths:
    raise ValueError("evaluate_and_report needs mixture_or_task and task_feature_lengths "
                     "(or the gin bindings train.mixture / train.task_feature_lengths).")
  mesh = mesh or partitioning.create_mesh()
  rules = partitioning.logical_axis_rules()
  model = model or pali_model.build_model_for_image_size(image_size)
  if params is None:
    directory = os.path.join(model_dir, "checkpoints")
    steps = checkpoint_steps(directory)
    if not steps:
      raise FileNotFoundError(f"No finished checkpoint in {directory}: train first.")
    step = steps[-1] if step is None else step
    params = checkpoints.restore_params(directory, step, abstract_params(
        model, mesh, rules, image_size=image_size, max_images=max_images,
        task_feature_lengths=task_feature_lengths))
  evaluator = Evaluator(model, mesh=mesh, rules=rules, task_feature_lengths=task_feature_lengths,
                        image_size=image_size, max_images=max_images, settings=settings)
  results = evaluator.evaluate(params, mixture_or_task=mixture_or_task, step=step or 0,
                               model_dir=model_dir)
  evaluator.close()
  if _is_lead() and results:
    print(f"\nEvaluation of {model_dir} at step {step} on {mixture_or_task}:\n"
          + format_table(results))
    pictures, titles = [], []
    for task, pics in evaluator.pictures.items():
      pictures += pics[:2]
      titles += [task] * len(pics[:2])
    if pictures:
      picture_path = picture_path or os.path.join(model_dir, "eval", "predictions.png")
      visualize.save_png(picture_path, visualize.grid(pictures, columns=4, titles=titles))
      print(f"Predictions drawn in {picture_path}")
  return results


class TrainingEval:
  """Evaluation inside `train()`: every `every` steps (and at the last step) on `mixture`;
  with `final_report`, the last evaluation also prints the table and saves predictions.png
  (as `evaluate_and_report`). Builds its Evaluator on first use."""

  def __init__(self, *, every: int, final_report: bool, mixture: str, model, mesh, rules,
               model_dir: str, task_feature_lengths, image_size: int, max_images: int):
    self.every, self.final_report, self.mixture = every, final_report, mixture
    self._kw = dict(model=model, mesh=mesh, task_feature_lengths=task_feature_lengths,
                    image_size=image_size, max_images=max_images)
    self._rules, self._model_dir = rules, model_dir
    self._evaluator: Optional[Evaluator] = None

  def maybe_run(self, step: int, params, *, last: bool) -> Optional[dict]:
    if last and self.final_report:
      return evaluate_and_report(self._model_dir, mixture_or_task=self.mixture, step=step,
                                 params=params, **self._kw)
    if not self.every or not (step % self.every == 0 or last):
      return None
    if self._evaluator is None:
      kw = dict(self._kw)
      self._evaluator = Evaluator(kw.pop("model"), rules=self._rules, **kw)
    return self._evaluator.evaluate(params, mixture_or_task=self.mixture, step=step,
                                    model_dir=self._model_dir)

  def close(self) -> None:
    if self._evaluator is not None:
      self._evaluator.close()
