"""Where a jitted step spends its time: a JAX profiler trace summarised by XLA op kind.

  with jax.profiler.trace(log_dir, create_perfetto_trace=True): ...run a few steps...
  rows = summarise(log_dir)   # [{'op': 'ynn_fusion', 'ms_per_step': ..., 'share': ...}, ...]

Events of XLA's CPU runtime threads are grouped by name with the trailing '.N' numbering
removed (fusion.12 and fusion.40 -> fusion); durations are summed over all threads, so on
several cores the shares are of busy thread time, not of wall time. The trace is read with
the standard library (gzip + json): no profiler plugin is needed.
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


def describe(name: str, instrs: dict, comps: dict) -> str:
  """'dot f32[1568,1536] <- f32[1568,384] x f32[384,1536]'-style description of an op."""
  shape, opcode, rest = instrs.get(name, ("?", "?", ""))
  called = re.search(r"calls=%?([\w.\-]+)", rest)
  inner = comps.get(called.group(1), []) if called else []
  dots = [n for n in inner if instrs[n][1] in ("dot", "convolution")]
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
