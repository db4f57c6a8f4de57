"""Tests of bench/profile_summary.py on a hand-made trace and HLO text with known overlaps."""
import gzip
import json
import os

import pytest

from bench import profile_summary

HLO = """HloModule step

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_bmm (q: f32[2,4,8], k: f32[2,8,4]) -> f32[2,4,4] {
  %q = f32[2,4,8]{2,1,0} parameter(0)
  %k = f32[2,8,4]{2,1,0} parameter(1)
  ROOT %b = f32[2,4,4]{2,1,0} dot(%q, %k), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

%fused_add (a: f32[4,2]) -> f32[4,2] {
  %a = f32[4,2]{1,0} parameter(0)
  ROOT %s = f32[4,2]{1,0} add(%a, %a)
}

%fused_sum (r: f32[4,2]) -> f32[4] {
  %r = f32[4,2]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %t = f32[4]{0} reduce(%r, %zero), dimensions={1}, to_apply=%add
}

%fused_cast (c: f32[4,2]) -> bf16[4,2] {
  %c = f32[4,2]{1,0} parameter(0)
  ROOT %h = bf16[4,2]{1,0} convert(%c)
}

ENTRY %main (x: f32[4,8], w: f32[8,2], q: f32[2,4,8], k: f32[2,8,4]) -> f32[4,2] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,2]{1,0} parameter(1)
  %q.1 = f32[2,4,8]{2,1,0} parameter(2)
  %k.1 = f32[2,8,4]{2,1,0} parameter(3)
  %dot_fusion = f32[4,2]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %bmm_fusion = f32[2,4,4]{2,1,0} fusion(%q.1, %k.1), kind=kCustom, calls=%fused_bmm
  %add_fusion = f32[4,2]{1,0} fusion(%dot_fusion), kind=kLoop, calls=%fused_add
  %sum_fusion = f32[4]{0} fusion(%add_fusion), kind=kLoop, calls=%fused_sum
  %cast_fusion = bf16[4,2]{1,0} fusion(%add_fusion), kind=kLoop, calls=%fused_cast
  ROOT %copy.1 = f32[4,2]{0,1} copy(%add_fusion)
}
"""


def _write_trace(log_dir, events):
  path = os.path.join(log_dir, "plugins", "profile", "run")
  os.makedirs(path)
  with gzip.open(os.path.join(path, "perfetto_trace.json.gz"), "wt") as fh:
    json.dump({"traceEvents": [{"ph": "X", "pid": 1, "tid": 1, **e} for e in events]}, fh)


def test_categories_come_from_the_called_computation():
  instrs, comps = profile_summary._hlo_index(HLO)
  got = {n: profile_summary.category(n, instrs, comps)
         for n in ("dot_fusion", "bmm_fusion", "add_fusion", "sum_fusion", "cast_fusion",
                   "copy.1")}
  assert got == {"dot_fusion": "dot", "bmm_fusion": "dot, batched",
                 "add_fusion": "elementwise / other", "sum_fusion": "reduction",
                 "cast_fusion": "convert", "copy.1": "copy / transpose"}


def test_by_wall_shares_overlapping_time_and_counts_two_dots(tmp_path):
  # Microseconds: the dot and the batched dot overlap for 50; nothing runs from 150 to 200;
  # the host-side PjitFunction event spans everything and must be ignored.
  _write_trace(str(tmp_path), [
      {"name": "PjitFunction(step)", "ts": 0, "dur": 400},
      {"name": "dot_fusion", "ts": 0, "dur": 100},
      {"name": "bmm_fusion", "ts": 50, "dur": 100},
      {"name": "add_fusion", "ts": 200, "dur": 50},
      {"name": "copy.1", "ts": 250, "dur": 50},
  ])
  out = profile_summary.by_wall(str(tmp_path), HLO, steps=1)
  ms = {r["category"]: r["ms_per_step"] for r in out["rows"]}
  assert ms == pytest.approx({"dot": 0.075, "dot, batched": 0.075,
                              "elementwise / other": 0.05, "copy / transpose": 0.05})
  assert out["wall_ms_per_step"] == pytest.approx(0.3)
  assert out["idle_ms_per_step"] == pytest.approx(0.05)
  assert out["two_dots_ms_per_step"] == pytest.approx(0.05)
  shares = {r["category"]: r["share"] for r in out["rows"]}
  assert shares["dot"] == pytest.approx(0.25)
  # Busy-thread time, by contrast, counts the overlap twice.
  busy = {r["op"]: r["ms_per_step"] for r in profile_summary.summarise(str(tmp_path))}
  assert busy["dot_fusion"] == pytest.approx(0.1) and busy["bmm_fusion"] == pytest.approx(0.1)
