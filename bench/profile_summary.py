"""Where a jitted step spends its time: a JAX profiler trace summarised by XLA op kind.

  with jax.profiler.trace(log_dir, create_perfetto_trace=True): ...run a few steps...
  rows = summarise(log_dir)   # [{'op': 'ynn_fusion', 'ms_per_step': ..., 'share': ...}, ...]

Events of XLA's CPU runtime threads are grouped by name with the trailing '.N' numbering
removed (fusion.12 and fusion.40 -> fusion); durations are summed over all threads, so on
several cores the shares are of busy thread time, not of wall time. `by_wall` divides wall
time instead: XLA's CPU runtime runs any op whose inputs are ready, so ops overlap (two dots
at once, a dot beside an elementwise op), and each moment is shared equally among the ops
running then. The trace is read with the standard library (gzip + json): no profiler plugin
is needed.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

_NUMBERED = re.compile(r"[._]\d+$")
# Host-side bookkeeping of the Python/PjRt layers, not XLA ops.
_HOST = ("$", "PjitFunction", "CommonPjRt", "Allocate", "Handle inputs", "ParseArguments",
         "PythonRefManager", "end: ", "ThunkExecutor", "np.asarray", "SlinkyThreadPool")


def _trace_file(log_dir: str) -> str:
  files = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not files:
    raise FileNotFoundError(f"No perfetto_trace.json.gz under {log_dir}: trace with "
                            "jax.profiler.trace(log_dir, create_perfetto_trace=True).")
  return files[-1]


def op_kind(name: str) -> str:
  while _NUMBERED.search(name):
    name = _NUMBERED.sub("", name)
  return name


def summarise(log_dir: str, steps: int = 1, top: int = 25) -> list[dict]:
  with gzip.open(_trace_file(log_dir)) as fh:
    data = json.load(fh)
  events = data["traceEvents"] if isinstance(data, dict) else data
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or any(e["name"].startswith(h) for h in _HOST):
      continue
    kind = op_kind(e["name"])
    total[kind] += e.get("dur", 0.0)
    count[kind] += 1
  busy = sum(total.values()) or 1.0
  return [{"op": k, "ms_per_step": v / 1e3 / steps, "share": v / busy,
           "calls_per_step": count[k] / steps} for k, v in total.most_common(top)]


def _events(log_dir: str) -> list[dict]:
  with gzip.open(_trace_file(log_dir)) as fh:
    data = json.load(fh)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events
          if e.get("ph") == "X" and not any(e["name"].startswith(h) for h in _HOST)]


_DOTS = ("dot", "convolution")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w-]*)\((.*)$")


def _hlo_index(hlo_text: str) -> tuple[dict, dict]:
  """{instruction: (shape, opcode, rest)} and {computation: [instructions]} of an HLO module."""
  instrs, comps, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
      current = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else "ENTRY"
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, opcode, rest = m.groups()
      instrs[name] = (shape, opcode, rest)
      comps[current].append(name)
  return instrs, comps


def _called(name: str, instrs: dict, comps: dict) -> list[str] | None:
  """The instructions of the computation op `name` calls (a fusion's body), or None."""
  called = re.search(r"calls=%?([\w.\-]+)", instrs.get(name, ("", "", ""))[2])
  return comps.get(called.group(1), []) if called else None


def describe(name: str, instrs: dict, comps: dict) -> str:
  """'dot f32[1568,1536] <- f32[1568,384] x f32[384,1536]'-style description of an op."""
  shape, opcode, _ = instrs.get(name, ("?", "?", ""))
  inner = _called(name, instrs, comps) or []
  dots = [n for n in inner if instrs[n][1] in _DOTS]
  if not dots:
    kinds = sorted({instrs[n][1] for n in inner} - {"parameter", "bitcast", "constant"})
    return f"{opcode} {shape} [{' '.join(kinds[:6])}]"
  d = dots[0]
  operands = re.findall(r"%([\w.\-]+)", instrs[d][2])[:2]
  shapes = [instrs.get(o, ("?",))[0] for o in operands]
  dims = re.search(r"(lhs_batch_dims=\S+ )?(lhs_contracting_dims=\S+)", instrs[d][2])
  return f"{instrs[d][1]} {instrs[d][0]} <- {' x '.join(shapes)} {dims.group(0) if dims else ''}"


def by_op(log_dir: str, hlo_text: str, steps: int = 1, top: int = 30) -> list[dict]:
  """The `top` single ops by time per step, each described from the HLO text."""
  instrs, comps = _hlo_index(hlo_text)
  total, count = collections.Counter(), collections.Counter()
  for e in _events(log_dir):
    total[e["name"]] += e.get("dur", 0.0)
    count[e["name"]] += 1
  busy = sum(total.values()) or 1.0
  return [{"op": k, "ms_per_step": v / 1e3 / steps, "share": v / busy,
           "calls_per_step": count[k] / steps, "what": describe(k, instrs, comps)}
          for k, v in total.most_common(top)]


def category(name: str, instrs: dict, comps: dict) -> str:
  """What an op of the trace does, from the HLO: 'dot', 'dot, batched', 'reduction',
  'collective', 'copy / transpose', 'convert' or 'elementwise / other'."""
  opcode = instrs.get(name, ("?", "?", ""))[1]
  called = _called(name, instrs, comps)
  inner = [name] if called is None else called
  kinds = {instrs[n][1] for n in inner if n in instrs} or {opcode}
  dots = [n for n in inner if n in instrs and instrs[n][1] in _DOTS]
  if dots:
    return "dot, batched" if "lhs_batch_dims" in instrs[dots[0]][2] else "dot"
  if kinds & {"reduce", "reduce-window"}:
    return "reduction"
  if any(k.startswith(("all-", "collective", "reduce-scatter")) for k in kinds):
    return "collective"
  if kinds & {"transpose", "copy"}:
    return "copy / transpose"
  if "convert" in kinds:
    return "convert"
  return "elementwise / other"


def by_wall(log_dir: str, hlo_text: str, steps: int = 1) -> dict:
  """Wall time per step by `category`, each moment shared equally among the ops running then.

  Returns {'wall_ms_per_step', 'idle_ms_per_step' (no op running), 'two_dots_ms_per_step' (two
  or more dots at once, sharing the cores), 'rows': [{'category', 'ms_per_step', 'share'}]}.
  Wall time runs from the first op's start to the last op's end.
  """
  instrs, comps = _hlo_index(hlo_text)
  points = []
  for e in _events(log_dir):
    kind = category(e["name"], instrs, comps)
    points += [(e["ts"], 1, kind), (e["ts"] + e.get("dur", 0.0), -1, kind)]
  if not points:
    return {"wall_ms_per_step": 0.0, "idle_ms_per_step": 0.0, "two_dots_ms_per_step": 0.0,
            "rows": []}
  points.sort(key=lambda p: (p[0], p[1]))  # ends before starts at the same instant
  running, shares = collections.Counter(), collections.Counter()
  idle = two_dots = 0.0
  last = points[0][0]
  for t, step, kind in points:
    dt, n = t - last, sum(running.values())
    if n == 0:
      idle += dt
    else:
      for k, c in running.items():
        shares[k] += dt * c / n
    if running["dot"] + running["dot, batched"] >= 2:
      two_dots += dt
    running[kind] += step
    last = t
  wall = points[-1][0] - points[0][0] or 1.0
  per_step = lambda us: us / 1e3 / steps  # noqa: E731
  return {"wall_ms_per_step": per_step(wall), "idle_ms_per_step": per_step(idle),
          "two_dots_ms_per_step": per_step(two_dots),
          "rows": [{"category": k, "ms_per_step": per_step(v), "share": v / wall}
                   for k, v in shares.most_common()]}
