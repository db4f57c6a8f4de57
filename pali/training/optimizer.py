"""Optimizers, learning-rate schedules, per-parameter learning-rate multipliers and parameter
freezing, all from optax and gin.

Frozen parameters (regexes over '/'-joined parameter paths) get `optax.set_to_zero()`, whose
state is empty, so no optimizer memory is spent on them; the trainer also stops their gradients
so XLA drops that part of the backward pass.
"""
from __future__ import annotations

import re
from typing import Sequence

import gin
import jax
import optax

from pali.training import adafactor


@gin.configurable
def learning_rate_schedule(name: str = "rsqrt", *, base_learning_rate: float = 1e-2,
                           warmup_steps: int = 1000, total_steps: int = 100_000,
                           step_offset: int = 0, end_fraction: float = 0.0) -> optax.Schedule:
  """'rsqrt' (linear warm-up then base * sqrt(warmup / step), PaLI/t5x style), 'cosine' (warm-up
  then cosine decay to end_fraction * base over total_steps) or 'constant' (after warm-up).

  `step_offset` shifts the schedule so a later stage can continue it: pass the number of steps
  the previous stages ran.
  """
  warmup = max(int(warmup_steps), 0)

  def rsqrt(step):
    step = jax.numpy.maximum(step, 1)
    decay = jax.numpy.sqrt(max(warmup, 1) / jax.numpy.maximum(step, max(warmup, 1)))
    ramp = jax.numpy.minimum(step / max(warmup, 1), 1.0) if warmup else 1.0
    return base_learning_rate * ramp * decay

  if name == "rsqrt":
    schedule = rsqrt
  elif name == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, base_learning_rate, max(warmup, 1) if warmup else 1, max(total_steps, warmup + 1),
        end_value=base_learning_rate * end_fraction)
  elif name == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, base_learning_rate, max(warmup, 1)),
         optax.constant_schedule(base_learning_rate)], [max(warmup, 1)]) if warmup else (
             optax.constant_schedule(base_learning_rate))
  else:
    raise ValueError(f"learning_rate_schedule.name={name!r}: use 'rsqrt', 'cosine' or 'constant'.")
  if step_offset:
    return lambda step: schedule(step + step_offset)
  return schedule


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_mask(params, patterns: Sequence[str]):
  """True for parameters whose '/'-joined path matches one of the regexes (re.search)."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(c.search(path_str(path)) for c in compiled), params)


def multiplier_tree(params, multipliers: Sequence[tuple[str, float]]):
  """Per parameter, the factor of the first (regex, factor) whose regex matches its '/'-joined
  path (re.search), else 1.0. A regex that matches no parameter is an error."""
  compiled = [(re.compile(p), float(f)) for p, f in multipliers]
  used = [False] * len(compiled)

  def factor(path, _):
    s = path_str(path)
    for i, (c, f) in enumerate(compiled):
      if c.search(s):
        used[i] = True
        return f
    return 1.0

  tree = jax.tree_util.tree_map_with_path(factor, params)
  unused = [p for (p, _), u in zip(multipliers, used) if not u]
  if unused:
    raise ValueError(f"create_optimizer.lr_multipliers: {unused} match no parameter; check "
                     "the paths (e.g. '^vit/').")
  return tree


def scale_by_multipliers(params, multipliers: Sequence[tuple[str, float]]
                         ) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its factor (`multiplier_tree`); no state. After an
  optimizer this scales that parameter's learning rate (weight decay included)."""
  return adafactor.scale_by_factors(multiplier_tree(params, multipliers))


@gin.configurable(denylist=["params", "schedule", "frozen_patterns"])
def create_optimizer(params, *, name: str = "adafactor", schedule: optax.Schedule | None = None,
                     clip_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     adafactor_decay_rate: float = 0.8, adafactor_momentum: float | None = None,
                     adafactor_factored: bool = True,
                     lr_multipliers: Sequence[tuple[str, float]] = (),
                     frozen_patterns: Sequence[str] = ()) -> optax.GradientTransformation:
  """Adafactor (t5x defaults: decay 0.8, parameter-scale updates, update clipping 1.0, factored
  second moments for matrices) or AdamW, after global-norm clipping, with freezing.

  `lr_multipliers`: [(regex, factor), ...] over '/'-joined parameter paths, e.g.
  `[('^vit/', 0.3)]` trains the ViT at 0.3x the schedule's rate (first match wins; as
  big_vision's `lr_mults`)."""
  schedule = schedule if schedule is not None else learning_rate_schedule()
  if name == "adafactor":
    # optax's chain (global-norm clip, Adafactor, per-parameter factors) in one pass per
    # parameter, with optax's state (see adafactor.py).
    return _frozen(params, frozen_patterns, adafactor.adafactor(
        schedule, clip_grad_norm=clip_grad_norm, decay_rate=adafactor_decay_rate,
        lr_factors=multiplier_tree(params, lr_multipliers) if lr_multipliers else None,
        momentum=adafactor_momentum, multiply_by_parameter_scale=True, clipping_threshold=1.0,
        factored=adafactor_factored, weight_decay_rate=weight_decay or None))
  if name != "adamw":
    raise ValueError(f"create_optimizer.name={name!r}: use 'adafactor' or 'adamw'.")
  tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if lr_multipliers:
    tx = optax.chain(tx, scale_by_multipliers(params, lr_multipliers))
  if clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
  return _frozen(params, frozen_patterns, tx)


def _frozen(params, frozen_patterns: Sequence[str], tx: optax.GradientTransformation
            ) -> optax.GradientTransformation:
  """`tx` for the parameters not matched by `frozen_patterns`, `optax.set_to_zero()` for
  those that are."""
  if not frozen_patterns:
    return tx
  mask = frozen_mask(params, frozen_patterns)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError(f"create_optimizer.frozen_patterns={list(frozen_patterns)} match no "
                     "parameter; check the paths (e.g. '^vit/').")
  labels = jax.tree_util.tree_map(lambda m: "frozen" if m else "train", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
