"""Warm start: initialise a run from another run's checkpoint (the previous training stage).

Parameters are matched by their '/'-joined paths, optionally renamed by regex rules
(`assignment_map`, t5x style: `(dest_regex, source_replacement_or_None)`; None keeps the fresh
initialisation). A learned ViT position table whose grid changed is resampled bilinearly;
scanned (`name` with a leading layers axis) and unscanned (`name_0`, `name_1`, ...) stacks are
converted both ways. Any other shape mismatch is refused with both shapes named. The optimizer
state and the step start fresh unless `load_optimizer` / `load_step` ask for them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.sharding import NamedSharding

from pali.training import train_state as train_state_lib

_POSEMB = re.compile(r"(^|/)(pos_embedding|posemb)[^/]*$")
_SCAN_INDEX = re.compile(r"^(.*)_(\d+)$")


class WarmStartError(ValueError):
  pass


@dataclasses.dataclass
class WarmStartReport:
  loaded: list[str] = dataclasses.field(default_factory=list)
  resized: list[str] = dataclasses.field(default_factory=list)
  converted: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)


def find_checkpoint(init_from: str) -> tuple[str, int]:
  """Accepts a MODEL_DIR, its checkpoints/ folder or one step folder; returns (dir, step)."""
  path = os.path.abspath(init_from)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
  if not steps:
    raise WarmStartError(f"INIT_FROM={init_from!r} holds no finished checkpoint (expected "
                         "MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/<step>).")
  return path, max(steps)


def _flat(tree) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _read_params(state_dir: str, wanted: dict[str, Any]) -> dict[str, np.ndarray]:
  """Restores the listed source parameters (path -> sharding or None for host numpy)."""
  tree = traverse_util.unflatten_dict({tuple(("params/" + k).split("/")): v
                                       for k, v in wanted.items()})

  def args(sharding):
    return (ocp.ArrayRestoreArgs(sharding=sharding) if sharding is not None
            else ocp.RestoreArgs(restore_type=np.ndarray))

  restore_args = jax.tree_util.tree_map(args, tree, is_leaf=lambda x: x is None or isinstance(
      x, NamedSharding))
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(item=restore_args, restore_args=restore_args,
                                             partial_restore=True))
  return _flat(restored["params"])


def _source_metadata(state_dir: str) -> dict[str, Any]:
  md = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  return _flat(tree["params"])


def plan_mapping(dest: dict[str, Any], source: dict[str, Any],
                 assignment_map: Sequence[tuple[str, str | None]] = ()):
  """For each destination path: ('load', src) | ('resample', src) | ('stack', [srcs]) |
  ('slice', src, i) | ('fresh', None). Raises on an unfixable shape mismatch."""
  plan = {}
  for path, dst in dest.items():
    src = path
    for pattern, replacement in assignment_map:
      if re.search(pattern, path):
        src = None if replacement is None else re.sub(pattern, replacement, path)
        break
    if src is None:
      plan[path] = ("fresh", None)
      continue
    if src in source:
      s_shape, d_shape = tuple(source[src].shape), tuple(dst.shape)
      if s_shape == d_shape:
        plan[path] = ("load", src)
      elif _POSEMB.search(path) and len(s_shape) == len(d_shape) and s_shape[-1] == d_shape[-1]:
        plan[path] = ("resample", src)
      else:
        raise WarmStartError(
            f"Parameter {path}: the checkpoint has shape {s_shape}, the model wants {d_shape}, "
            "and no rule resizes it. Map it to None in warm_start_state.assignment_map to "
            "initialise it fresh, or fix the model config.")
      continue
    parts = src.split("/")
    # Scanned destination from an unscanned source: stack name_0..name_{n-1}.
    stacked = None
    for i, part in enumerate(parts):
      first = "/".join(parts[:i] + [f"{part}_0"] + parts[i + 1:])
      if first in source:
        n = dst.shape[0]
        srcs = ["/".join(parts[:i] + [f"{part}_{j}"] + parts[i + 1:]) for j in range(n)]
        if all(s in source for s in srcs):
          stacked = srcs
        break
    if stacked:
      plan[path] = ("stack", stacked)
      continue
    # Unscanned destination from a scanned source: take slice i of name.
    sliced = None
    for i, part in enumerate(parts):
      m = _SCAN_INDEX.match(part)
      if m:
        cand = "/".join(parts[:i] + [m.group(1)] + parts[i + 1:])
        if cand in source:
          sliced = (cand, int(m.group(2)))
          break
    plan[path] = ("slice",) + sliced if sliced else ("fresh", None)
  return plan


def _resample(table: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
  from pali.models import vit
  new_len = new_shape[-2]
  grid = int(round(np.sqrt(new_len)))
  if grid * grid != new_len:
    raise WarmStartError(f"Cannot resample a position table to {new_shape}: not a square grid.")
  out = np.asarray(vit.resample_posemb(np.asarray(table), grid))
  return out.reshape(new_shape)


@gin.configurable(denylist=["init_from", "model", "tx", "abstract", "shardings", "dummy", "seed"])
def warm_start_state(init_from: str, *, model, tx, abstract, shardings, dummy, seed: int = 0,
                     assignment_map: Sequence[tuple[str, str | None]] = (),
                     load_optimizer: bool = False, load_step: bool = False):
  """Builds a TrainState in its shards from the checkpoint at `init_from`."""
  ckpt_dir, step = find_checkpoint(init_from)
  state_dir = os.path.join(ckpt_dir, str(step), "state")
  logging.info("Warm start from %s (step %d)", ckpt_dir, step)
  if load_optimizer:
    restored = ocp.StandardCheckpointer().restore(state_dir, abstract)
    if not load_step:
      restored = restored.replace(step=jax.numpy.zeros_like(restored.step))
    return restored

  source = _source_metadata(state_dir)
  dest = _flat(abstract.params)
  dest_sh = _flat(shardings.params)
  plan = plan_mapping(dest, source, assignment_map)
  wanted: dict[str, Any] = {}
  for path, (kind, *srcs) in plan.items():
    if kind == "load":
      wanted[srcs[0]] = dest_sh[path]
    elif kind in ("resample", "slice"):
      wanted[srcs[0]] = None
    elif kind == "stack":
      wanted.update({s: None for s in srcs[0]})
  values = _read_params(state_dir, wanted) if wanted else {}

  fresh_state = train_state_lib.create_state(model, tx, dummy, shardings, seed)
  params = _flat(fresh_state.params)
  report = WarmStartReport()
  for path, (kind, *rest) in plan.items():
    if kind == "fresh":
      report.fresh.append(path)
      continue
    if kind == "load":
      value = values[rest[0]]
      report.loaded.append(path)
    elif kind == "resample":
      value = _resample(values[rest[0]], dest[path].shape)
      report.resized.append(f"{path}: {tuple(source[rest[0]].shape)} -> {dest[path].shape}")
    elif kind == "stack":
      value = np.stack([values[s] for s in rest[0]])
      report.converted.append(f"{path} <- {rest[0][0]}..")
    else:  # slice
      value = values[rest[0]][rest[1]]
      report.converted.append(f"{path} <- {rest[0]}[{rest[1]}]")
    if tuple(value.shape) != tuple(dest[path].shape):
      raise WarmStartError(f"Parameter {path}: converted shape {tuple(value.shape)} != "
                           f"{tuple(dest[path].shape)}.")
    params[path] = jax.device_put(np.asarray(value, dest[path].dtype), dest_sh[path])
  used = {s for _, (k, *r) in plan.items() if k != "fresh"
          for s in (r[0] if k == "stack" else [r[0]])}
  report.unused = sorted(set(source) - used)
  _log_report(report)
  new_params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})
  state = fresh_state.replace(params=new_params)
  if load_step:
    state = state.replace(step=jax.device_put(np.int32(step), shardings.step))
  return state


def _log_report(report: WarmStartReport) -> None:
  logging.info("Warm start: %d loaded, %d resized, %d converted (scan layout), %d fresh, "
               "%d unused in the checkpoint.", len(report.loaded), len(report.resized),
               len(report.converted), len(report.fresh), len(report.unused))
  for line in report.resized:
    logging.info("  resized %s", line)
  for line in report.converted:
    logging.info("  converted %s", line)
  for line in report.fresh:
    logging.info("  fresh %s", line)
  for line in report.unused:
    logging.info("  unused %s", line)
