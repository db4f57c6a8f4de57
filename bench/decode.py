r"""Greedy decoding tokens/s with the KV cache against decoding without it.

  python bench/decode.py                                  # pali_tiny and pali_small
  python bench/decode.py --configs gin_configs/models/pali_small.gin --decode_len 64 --json d.json

Three ways to produce the same greedy tokens (checked equal), each one jitted while-loop:
- `kv_cache`: pali.decoding.decode_batch (encoder once, one decoder position per step).
- `no_cache_decoder`: encoder once, then the whole decoder re-run over the padded [B, decode_len]
  target buffer for every new token.
- `no_cache_full`: the full model forward (ViT, encoder and decoder) for every new token.
EOS is disabled so every row decodes exactly `decode_len` tokens. Compile time is apart.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

DEFAULT_CONFIGS = ("gin_configs/models/pali_tiny.gin", "gin_configs/models/pali_small.gin")
DEFAULT_IMAGE_SIZE = {"pali_tiny.gin": 64, "pali_small.gin": 224}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--image_size", type=int, default=None, help="default: 64 tiny, 224 small")
  p.add_argument("--input_len", type=int, default=32)
  p.add_argument("--decode_len", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
  p.add_argument("--methods", nargs="+",
                 default=["kv_cache", "no_cache_decoder", "no_cache_full"])
  p.add_argument("--no_tcmalloc", action="store_true")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def _decoders(model, decode_len):
  import jax
  import jax.numpy as jnp

  from pali import decoding

  never = -1  # an EOS id no token equals: every row decodes decode_len tokens

  def kv_cache(params, batch):
    return decoding.decode_batch(model, params, batch, max_decode_len=decode_len,
                                 eos_id=never)[0]

  def _no_cache(params, batch, logits_fn):
    b = batch["encoder_input_tokens"].shape[0]

    def tokens_to_logits(token_ids, state):
      buf, i = state
      buf = jax.lax.dynamic_update_slice(buf, token_ids, (0, i))
      logits = logits_fn(buf)  # [B, decode_len, V]: every position recomputed
      return jax.lax.dynamic_index_in_dim(logits, i, 1, keepdims=False), (buf, i + 1)

    state = (jnp.zeros((b, decode_len), jnp.int32), jnp.array(0, jnp.int32))
    return decoding.greedy(tokens_to_logits, state, b, decode_len, eos_id=never)[0]

  def no_cache_decoder(params, batch):
    v = {"params": params}
    encoded, mask = model.apply(v, batch["images"], batch["image_mask"],
                                batch["encoder_input_tokens"], method=model.encode)
    return _no_cache(params, batch, lambda buf: model.apply(v, encoded, mask, buf,
                                                            method=model.decode))

  def no_cache_full(params, batch):
    v = {"params": params}
    return _no_cache(params, batch, lambda buf: model.apply(
        v, dict(batch, decoder_input_tokens=buf)))

  return {"kv_cache": kv_cache, "no_cache_decoder": no_cache_decoder,
          "no_cache_full": no_cache_full}


def run_config(config_path: str, args) -> list[dict]:
  import gin
  import jax
  import numpy as np

  from pali.models import pali as pali_model

  name = os.path.basename(config_path)
  image_size = args.image_size or DEFAULT_IMAGE_SIZE.get(name, 224)
  gin.clear_config()
  path = config_path if os.path.isabs(config_path) else os.path.join(common.REPO_ROOT,
                                                                     config_path)
  gin.parse_config_files_and_bindings([path], [f"DTYPE = '{args.dtype}'"])
  model = pali_model.build_model_for_image_size(image_size)
  rng = np.random.default_rng(0)
  b = args.batch
  batch = {
      "images": rng.integers(0, 256, (b, 1, image_size, image_size, 3)).astype(np.uint8),
      "image_mask": np.ones((b, 1), np.int32),
      "encoder_input_tokens": rng.integers(3, model.config.t5.vocab_size,
                                           (b, args.input_len)).astype(np.int32),
  }
  params = jax.jit(lambda r: model.init(r, pali_model.dummy_batch(
      b, image_size, 1, args.input_len, args.decode_len))["params"])(jax.random.key(0))
  rows, reference = [], None
  for method, fn in _decoders(model, args.decode_len).items():
    if method not in args.methods:
      continue
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    out = {}

    def call():
      out["tokens"] = np.asarray(compiled(params, batch))  # blocks

    times = common.time_calls(call, args.repeats, warmup=1)
    reference = out["tokens"] if reference is None else reference
    med = common.median(times)
    rows.append({"config": name, "method": method, "batch": b, "image_size": image_size,
                 "decode_len": args.decode_len, "compile_s": compile_s, "median_s": med,
                 "tokens_per_s": b * args.decode_len / med,
                 "same_tokens_as_first": bool(np.array_equal(out["tokens"], reference))})
  base = {r["config"]: r["tokens_per_s"] for r in rows if r["method"] == "kv_cache"}
  for r in rows:
    if r["config"] in base:
      r["kv_cache_speedup"] = base[r["config"]] / r["tokens_per_s"]
  return rows


def main(argv=None):
  args = parse_args(argv)
  common.prepare_process(args.no_tcmalloc)  # re-executes with tcmalloc where installed
  rows = []
  for config in args.configs:
    rows += run_config(config, args)
  machine = common.machine_info()
  print(common.format_table(rows, ["config", "method", "batch", "decode_len", "compile_s",
                                   "median_s", "tokens_per_s", "kv_cache_speedup",
                                   "same_tokens_as_first"]))
  print(common.machine_line(machine))
  common.write_json(args.json, {"benchmark": "decode", "machine": machine,
                                "settings": vars(args), "results": rows})
  return rows


if __name__ == "__main__":
  main()
