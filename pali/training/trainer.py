"""The training loop: mesh, state in shards, data, jitted step, checkpoints, TensorBoard.

`train()` is gin-configurable; `launch/tpu_train.py` parses the gin files and calls it.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import gin
import jax
import numpy as np
from absl import logging
from clu import metric_writers

from pali import checkpoints, partitioning
from pali.evaluation import evaluator as evaluator_lib  # in-training eval lives there
from pali.training import losses, mfu, xla_options
from pali.training import optimizer as optimizer_lib
from pali.training import step as step_lib
from pali.training import train_state as train_state_lib
from pali.training import validation


class NonFiniteLossError(RuntimeError):
  pass


@dataclasses.dataclass
class TrainResult:
  state: Any
  step: int
  last_metrics: dict
  preempted: bool = False
  first_loss: float | None = None


class _PreemptionFlag:
  """SIGTERM (a preemption notice) sets a flag; the loop saves and exits at the next step."""

  def __init__(self):
    self.event = threading.Event()
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _batch_tokens(batch_shapes: Mapping[str, tuple], patches_per_image: int) -> int:
  """Encoder positions (image patches + text) plus decoder positions of one padded batch."""
  b, n_img = batch_shapes["image_mask"]
  return b * (n_img * patches_per_image + batch_shapes["encoder_input_tokens"][1]
              + batch_shapes["decoder_target_tokens"][1])


def _loc_targets(sigma: float):
  """Soft targets over the <loc> bins of the vocabulary (losses.LocTargets), or None."""
  if not sigma:
    return None
  if sigma < 0:
    raise validation.ConfigError(f"train.loc_label_sigma={sigma}: must be >= 0 (in bins).")
  from pali.data import vocabulary
  vocab = vocabulary.get_vocabulary()
  return losses.LocTargets(vocab.first_loc_id, vocabulary.NUM_LOC_TOKENS, float(sigma))


# `dataset_fn` is configurable (`train.dataset_fn = @my_fn`) so tests and users can swap the
# data source without code; `model` stays denylisted (gin builds it through build_model).
@gin.configurable(denylist=["model"])
def train(*, model_dir: str = gin.REQUIRED, mixture: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, image_size: int = 224,
          max_images: int = 1, seed: int = 0, checkpoint_every: int = 1000,
          keep_checkpoints: int = 3, log_every: int = 50, grad_accum_steps: int = 1,
          z_loss: float = 1e-4, label_smoothing: float = 0.0, loc_label_sigma: float = 0.0,
          on_nonfinite: str = "stop",
          init_from: str | None = None, frozen_patterns: tuple[str, ...] = (), model=None,
          dataset_fn: Callable[..., Any] | None = None, eval_every: int = 0,
          eval_mixture: str | None = None, final_eval: bool = False) -> TrainResult:
  """Trains until `train_steps` (resuming from the latest checkpoint in `model_dir`).

  eval_every > 0 evaluates `eval_mixture` (default: `mixture`) every so many steps and at the
  end; final_eval prints a metrics table and saves predictions.png at the end (see
  pali.evaluation.evaluator).
  """
  from pali.data import pipeline
  from pali.models import pali as pali_model

  model_dir = checkpoints.absolute(model_dir) if model_dir else model_dir
  model = model if model is not None else pali_model.build_model_for_image_size(image_size)
  try:
    mesh = partitioning.create_mesh()
    rules = partitioning.logical_axis_rules()
  except ValueError as e:
    raise validation.ConfigError(f"{e} (gin: create_mesh.data/fsdp/tensor)") from e
  validation.validate_train_config(
      model_dir=model_dir, mixture=mixture, batch_size=batch_size, image_size=image_size,
      patch_size=model.config.vit.patch_size, mesh=mesh, rules=rules,
      grad_accum_steps=grad_accum_steps, on_nonfinite=on_nonfinite, init_from=init_from,
      check_mixture=dataset_fn is None, model_vocab_size=model.config.t5.vocab_size)
  loc_targets = _loc_targets(loc_label_sigma)

  num_hosts, host_id = jax.process_count(), jax.process_index()
  host_batch = batch_size // num_hosts
  micro_batch = batch_size // grad_accum_steps
  dummy = pali_model.dummy_batch(micro_batch, image_size, max_images,
                                 task_feature_lengths["inputs"], task_feature_lengths["targets"])
  schedule = optimizer_lib.learning_rate_schedule()
  tx_fn = lambda params: optimizer_lib.create_optimizer(  # noqa: E731
      params, schedule=schedule, frozen_patterns=tuple(frozen_patterns))
  with jax.set_mesh(mesh), _logical_rules(rules):
    tx, abstract, shardings = train_state_lib.abstract_state(model, tx_fn, dummy, mesh, rules, seed)
    frozen = (optimizer_lib.frozen_mask(abstract.params, frozen_patterns)
              if frozen_patterns else None)

    ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                    save_every=checkpoint_every, keep=keep_checkpoints)
    latest = ckpt.latest_step()
    data_state: dict = {}
    if latest is not None:
      logging.info("Resuming from checkpoint step %d in %s", latest, model_dir)
      state, data_state = ckpt.restore(latest, abstract)
    elif init_from:
      from pali import warm_start
      state = warm_start.warm_start_state(
          init_from, model=model, tx=tx, abstract=abstract, shardings=shardings, dummy=dummy,
          seed=seed)
    else:
      state = train_state_lib.create_state(model, tx, dummy, shardings, seed)
    start_step = int(jax.device_get(state.step))

    make_ds = dataset_fn or pipeline.get_dataset
    ds = make_ds(mixture, split="train", task_feature_lengths=dict(task_feature_lengths),
                 batch_size=host_batch, image_size=image_size, max_images=max_images,
                 shuffle=True, seed=seed, shard_id=host_id, num_shards=num_hosts)
    consumed = int(data_state.get("batches_consumed", start_step))
    if consumed:
      ds = ds.skip(consumed)  # the pipeline is deterministic: same batches as an unbroken run
    batches = ds.as_numpy_iterator()

    step_fn = step_lib.make_train_step(
        model, tx, schedule, frozen=frozen, grad_accum_steps=grad_accum_steps, z_loss=z_loss,
        label_smoothing=label_smoothing, loc_targets=loc_targets,
        skip_nonfinite=True)
    batch_sh = {k: partitioning.batch_sharding(mesh, len(v.shape), rules) for k, v in dummy.items()}
    repl = partitioning.replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sh, repl),
                     out_shardings=(shardings, repl), donate_argnums=(0,))
    dropout_rng = jax.device_put(jax.random.key(seed + 1), repl)

    _save_config(model_dir)
    writer = metric_writers.create_default_writer(
        os.path.join(model_dir, "train"), just_logging=host_id > 0, asynchronous=True)
    global_shapes = {k: (batch_size,) + v.shape[1:] for k, v in dummy.items()}
    tokens_per_step = _batch_tokens(global_shapes, (image_size // model.config.vit.patch_size) ** 2)
    mfu_meter = mfu.MfuMeter.for_run(model.config, global_shapes, frozen=frozen)

    result = TrainResult(state=state, step=start_step, last_metrics={})
    if start_step >= train_steps:
      logging.info("Already at step %d >= train_steps=%d: nothing to do.", start_step, train_steps)
      ckpt.close()
      return result

    first = partitioning.host_batch_to_global(next(batches), mesh, rules)
    t0 = time.time()
    options = xla_options.train_step_compiler_options(mfu.run_matmul_dtype(model.config))
    compiled = xla_options.compile_lowered(jitted.lower(state, first, dropout_rng), options)
    compile_s = time.time() - t0
    logging.info("Compiled the train step in %.1f s (XLA options: %s)", compile_s,
                 options or "defaults")
    writer.write_scalars(start_step, {"compile_seconds": compile_s})

    pending: list[tuple[int, dict]] = []
    last_good = latest
    step, batch = start_step, first
    t_log, steps_at_log = time.time(), start_step
    evaluation = evaluator_lib.TrainingEval(
        every=eval_every, final_report=final_eval, mixture=eval_mixture or mixture, model=model,
        mesh=mesh, rules=rules, model_dir=model_dir, task_feature_lengths=task_feature_lengths,
        image_size=image_size, max_images=max_images)
    with _PreemptionFlag() as preempt:
      while step < train_steps:
        state, metrics = compiled(state, batch, dropout_rng)
        step += 1
        pending.append((step, metrics))
        if step < train_steps:
          batch = partitioning.host_batch_to_global(next(batches), mesh, rules)  # overlaps step
        # Read the SIGTERM flag once per step: a signal landing between two reads would
        # otherwise exit without the save it was promised (it waits for the next step instead).
        preempted = preempt.event.is_set()
        must_save = ckpt.should_save(step) or step == train_steps or preempted
        if step % log_every == 0 or must_save:
          fetched = _fetch(pending)
          pending = []
          bad = [s for s, m in fetched if m["nonfinite"]]
          if bad and on_nonfinite == "stop":
            ckpt.close()
            raise NonFiniteLossError(
                f"Non-finite loss or gradient at step {bad[0]} (the update was not applied). "
                f"Last good checkpoint: step {last_good} in {ckpt.directory}. Inspect the data "
                "near that step or lower the learning rate; set train.on_nonfinite='skip' to "
                "skip such updates instead.")
          if result.first_loss is None and fetched:
            result.first_loss = float(fetched[0][1]["loss"])
          now = time.time()
          rate = (step - steps_at_log) / max(now - t_log, 1e-9)
          t_log, steps_at_log = now, step
          summary = _summarise(fetched, rate, batch_size, tokens_per_step, mfu_meter)
          summary["skipped_nonfinite"] = float(len(bad))
          summary.update(_data_skip_counts())
          writer.write_scalars(step, summary)
          result.last_metrics = summary
          eta = (train_steps - step) / max(rate, 1e-9)
          logging.info("step %d/%d loss %.4f accuracy %.3f (%.2f steps/s, ETA %s)", step,
                       train_steps, summary["loss"], summary["accuracy"], rate,
                       time.strftime("%H:%M:%S", time.gmtime(eta)))
        if must_save:
          ckpt.save(step, state, {"batches_consumed": consumed + (step - start_step)})
          last_good = step
        if not preempted:
          evaluation.maybe_run(step, state.params, last=step == train_steps)
        if preempted:
          logging.info("SIGTERM received: saved a checkpoint at step %d; exiting.", step)
          result.preempted = True
          break
    ckpt.close()
    evaluation.close()
    writer.flush()
    writer.close()
    del batches
    result.state, result.step = state, step
    return result


def _save_config(model_dir: str) -> None:
  """The gin configuration of this run, next to its checkpoints (as t5x keeps config.gin)."""
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "config.gin"), "w") as fh:
      fh.write(gin.config_str())


def _fetch(pending):
  host = jax.device_get([m for _, m in pending])
  return [(s, m) for (s, _), m in zip(pending, host)]


def _summarise(fetched, steps_per_s, batch_size, tokens_per_step, mfu_meter=None) -> dict:
  keys = fetched[-1][1].keys()
  out = {k: float(np.mean([m[k] for _, m in fetched])) for k in keys if k != "nonfinite"}
  out["learning_rate"] = float(fetched[-1][1]["learning_rate"])
  out.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * batch_size,
             tokens_per_s=steps_per_s * tokens_per_step)
  if mfu_meter is not None:  # model_tflops_per_device, mfu (pali/training/mfu.py)
    out.update(mfu_meter.metrics(steps_per_s))
  return out


def _data_skip_counts() -> dict:
  try:
    from pali.data import pipeline
    counts = getattr(pipeline, "skip_counts", None)
    return {f"data/{k}": float(v) for k, v in (counts() if counts else {}).items()}
  except ImportError:
    return {}


def _logical_rules(rules):
  import flax.linen as nn
  return nn.logical_axis_rules(rules)
