"""Helpers shared by the bench/ scripts: machine description, timing, a table, JSON.

A benchmark prints a table and writes JSON (DESIGN.md); every JSON carries `machine` (CPU
model, cores, load average, allocator, XLA flags, JAX devices) so figures can be compared.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_repo_on_path() -> None:
  """Lets `python bench/x.py` import the project without installing it."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def cpu_model_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.lower().startswith("model name"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


_MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_matmul_flags() -> list[str]:
  """Which of the CPU features that decide matmul speed this CPU has (from /proc/cpuinfo):
  AVX2, AVX-512, AVX-512 BF16, AMX BF16. Figures from machines with other flags differ by
  several times (BENCHMARKS.md)."""
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return [f for f in _MATMUL_FLAGS if f in have]
  except OSError:
    pass
  return []


def load_average() -> tuple[float, float, float]:
  try:
    return tuple(round(x, 2) for x in os.getloadavg())
  except OSError:
    return (float("nan"),) * 3


def machine_info() -> dict[str, Any]:
  """What the figures depend on. Call after jax is importable (it reports the devices)."""
  import jax
  dev = jax.devices()[0]
  return {
      "cpu_model": cpu_model_name(),
      "cpu_count": os.cpu_count(),
      "cpu_matmul_flags": cpu_matmul_flags(),
      "load_average_1_5_15min": load_average(),
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "jax_version": jax.__version__,
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "python": platform.python_version(),
  }


def prepare_process(no_tcmalloc: bool) -> None:
  """The benchmark process environment the launcher also sets: tcmalloc preloaded where
  installed (re-executes the process), unless `no_tcmalloc`."""
  if no_tcmalloc:
    os.environ["PALI_NO_TCMALLOC"] = "1"
  from launch import launch_utils
  launch_utils.set_process_environment()


def machine_line(machine: Mapping[str, Any]) -> str:
  """One line naming what the figures depend on (from `machine_info`)."""
  flags = ", ".join(machine.get("cpu_matmul_flags") or []) or "no AVX2"
  return (f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores ({flags}), load "
          f"{machine['load_average_1_5_15min']}, LD_PRELOAD={machine.get('ld_preload') or '-'}, "
          f"XLA_FLAGS={machine.get('xla_flags') or '-'}")


def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
  """Seconds per call of `fn` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if v == 0 or 0.01 <= abs(v) < 1e6:
      return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"
  return str(v)


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A GitHub-markdown table (pasteable into BENCHMARKS.md)."""
  rows = list(rows)
  columns = list(columns or (rows[0].keys() if rows else []))
  cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa
  out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(row) for row in cells]
  return "\n".join(out)


def write_json(path: str | None, payload: Mapping[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(payload, fh, indent=2, sort_keys=True, default=str)
  print(f"wrote {path}")
