"""bench/optimizer_step.py runs both optimizer variants and they end at the same parameters."""
from bench import optimizer_step


def test_one_pass_and_optax_chain_time_and_agree_on_pali_tiny():
  args = optimizer_step.parse_args(["--config", "gin_configs/models/pali_tiny.gin",
                                    "--image_size", "64", "--rounds", "2",
                                    "--steps_per_round", "2"])
  rows = optimizer_step.run(args)
  assert [r["variant"] for r in rows] == ["one_pass", "optax_chain"]
  assert all(r["calls"] == 3 and r["median_ms"] > 0 for r in rows)
  assert rows[0]["vs_first"] == 1.0
  # The parameters moved, and both variants moved them alike (to rounding).
  moved = rows[0]["max_param_change"]
  assert moved > 0 and rows[1]["max_param_change"] > 0
  assert rows[1]["max_param_diff_vs_first"] < 1e-4 * moved
