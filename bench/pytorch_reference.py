r"""The PyTorch-parts reference for bench/train_step.py: the same model from Hugging Face parts.

  make bench-torch                                     # creates .venv-torch, runs this
  .venv-torch/bin/python bench/pytorch_reference.py [--threads 2] [--batch 8] [--steps 10]
      [--warmup 2] [--json out.json] [--compile]

What it builds (from `transformers` config objects only: random init, nothing downloaded):
- `ViTModel` (no pooler): hidden 384, 12 layers, 6 heads, intermediate 1536, patch 16, 224 px
  (ViT-S/16, as gin_configs/models/pali_small.gin). HF's ViT always prepends a [CLS] token,
  so it runs over 197 tokens; the CLS output is dropped and the 196 patch tokens are used
  (ours has no CLS; the extra token is ~0.5% of the ViT's work and is not counted).
- `Linear(384, 512)` projection (our `img_proj`).
- `T5ForConditionalGeneration`, T5.1.1-small-shaped: d_model 512, d_kv 64, 6 heads, d_ff 1024,
  8 + 8 layers, gated-GELU, vocab 32128, dropout 0, untied logits (shared input embedding
  for encoder and decoder, as ours).
Fusion as pali/models/pali.py: the projected patch tokens go IN FRONT of the embedded 32 text
tokens and enter the T5 encoder through `inputs_embeds` with the [image; text] attention mask
(also the cross-attention mask); the decoder reads the 32 shifted target tokens; weighted
token cross-entropy; `torch.optim.AdamW` step. float32 throughout, eager by default.

Measured like bench/train_step.py: the first step (allocation, lazy init; with --compile the
compilation) apart, then --warmup untimed steps, then the median of --steps timed steps, CPU
seconds per timed step (getrusage user+sys of this process: the comparable figure when other
jobs share the cores), examples/s, tokens/s, GFLOP/s with the project's FLOP count
(`pali.flops.train_step_flops`, imported from the repository, pure Python; if it cannot be
imported, the figure hard-wired below) and MFU against a 2048^3 float32 torch.matmul measured
in this process right after the timed steps (best of a few), so it sees the same load.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched; config objects only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench import common  # noqa: E402  (stdlib only at import time; no jax)

# Model GFLOP of one pali_small training step at 224 px, batch 8, 1 image, text 32 in / 32 out,
# from the project's FLOP model; used only where `pali.flops` cannot be imported. Recompute:
#   .venv/bin/python -c "import gin; from pali import flops; from pali.models.pali import \
#     PaliConfig; gin.parse_config_files_and_bindings(['gin_configs/models/pali_small.gin'], \
#     []); print(flops.train_step_flops(PaliConfig(), flops.BatchShapes(8, 224, 1, 32, 32))/1e9)"
# (printed 538.321354752 on 2026-11; bench/train_step.py reports the same 538.3). The count is
# linear in the batch, so other --batch values scale it.
PALI_SMALL_GFLOP_PER_STEP_B8 = 538.321354752

IMAGE_SIZE, MAX_IMAGES, INPUT_LEN, TARGET_LEN = 224, 1, 32, 32
VIT = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
           intermediate_size=1536, patch_size=16, image_size=IMAGE_SIZE)
T5 = dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8,
          vocab_size=32128)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threads", type=int, default=None,
                 help="torch.set_num_threads (default: all cores, os.cpu_count())")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
  p.add_argument("--gflop_per_step", type=float, default=None,
                 help="model GFLOP per step (default: pali.flops at these shapes)")
  p.add_argument("--compile", action="store_true",
                 help="torch.compile the model's forward (default: eager, the reference)")
  p.add_argument("--json", default=None, help="write the results here")
  return p.parse_args(argv)


def random_batch(batch: int, vocab_size: int):
  """bench/train_step.py's random_batch (same generator, seed, order and shapes)."""
  import numpy as np
  rng = np.random.default_rng(0)
  b, n, s = batch, MAX_IMAGES, IMAGE_SIZE
  tokens = lambda length: rng.integers(3, vocab_size, (b, length)).astype(np.int32)  # noqa
  targets = tokens(TARGET_LEN)
  return {
      "images": rng.integers(0, 256, (b, n, s, s, 3)).astype(np.uint8),
      "image_mask": np.ones((b, n), np.int32),
      "encoder_input_tokens": tokens(INPUT_LEN),
      "decoder_input_tokens": np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": np.ones((b, TARGET_LEN), np.float32),
  }


def step_gflop(batch: int, override: float | None) -> tuple[float, str]:
  """(GFLOP per step, where it came from)."""
  if override is not None:
    return override, "--gflop_per_step"
  try:
    from pali import flops
  except ImportError:
    return PALI_SMALL_GFLOP_PER_STEP_B8 * batch / 8, "hard-wired (pali.flops not importable)"
  # pali.flops reads only these fields; the shapes are the ones built here.
  cfg = types.SimpleNamespace(
      vit=types.SimpleNamespace(patch_size=VIT["patch_size"], width=VIT["hidden_size"],
                                depth=VIT["num_hidden_layers"], mlp_dim=VIT["intermediate_size"],
                                stem="patch"),
      t5=types.SimpleNamespace(vocab_size=T5["vocab_size"], d_model=T5["d_model"],
                               num_heads=T5["num_heads"], head_dim=T5["d_kv"], d_ff=T5["d_ff"],
                               num_encoder_layers=T5["num_layers"],
                               num_decoder_layers=T5["num_decoder_layers"]))
  shapes = flops.BatchShapes(batch=batch, image_size=IMAGE_SIZE, max_images=MAX_IMAGES,
                             input_len=INPUT_LEN, target_len=TARGET_LEN)
  return flops.train_step_flops(cfg, shapes) / 1e9, "pali.flops.train_step_flops"


def build(torch):
  import transformers
  vit_cfg = transformers.ViTConfig(**VIT, num_channels=3, hidden_act="gelu",
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   qkv_bias=True)
  t5_cfg = transformers.T5Config(**T5, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                 tie_word_embeddings=False, is_encoder_decoder=True,
                                 decoder_start_token_id=0, pad_token_id=0, use_cache=False)

  class PaliReference(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.vit = transformers.ViTModel(vit_cfg, add_pooling_layer=False)
      self.img_proj = torch.nn.Linear(VIT["hidden_size"], T5["d_model"])
      self.t5 = transformers.T5ForConditionalGeneration(t5_cfg)

    def forward(self, images, image_mask, encoder_input_tokens, decoder_input_tokens):
      b, n, h, w, c = images.shape
      pixels = images.reshape(b * n, h, w, c).permute(0, 3, 1, 2).float() / 127.5 - 1.0
      patches = self.vit(pixel_values=pixels).last_hidden_state[:, 1:]  # drop [CLS]
      p = patches.shape[1]
      img = self.img_proj(patches).reshape(b, n * p, -1)
      text = self.t5.get_input_embeddings()(encoder_input_tokens)
      x = torch.cat([img, text], dim=1)
      mask = torch.cat([torch.repeat_interleave(image_mask > 0, p, dim=1),
                        encoder_input_tokens != 0], dim=1).long()
      return self.t5(inputs_embeds=x, attention_mask=mask,
                     decoder_input_ids=decoder_input_tokens, use_cache=False).logits

  return PaliReference(), vit_cfg, t5_cfg


def measure_matmul_peak(torch, n: int = 2048, tries: int = 5) -> float:
  """FLOP/s of the best of `tries` float32 [n, n] @ [n, n] torch.matmul calls."""
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(a, b)
  best = float("inf")
  for _ in range(tries):
    t0 = time.perf_counter()
    torch.matmul(a, b)
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def run(args) -> tuple[dict, dict]:
  import torch
  import torch.nn.functional as F
  import transformers

  threads = args.threads or os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model, vit_cfg, t5_cfg = build(torch)
  model.train()
  if args.compile:
    model = torch.compile(model)
  opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

  host = random_batch(args.batch, T5["vocab_size"])
  batch = {k: torch.from_numpy(v) for k, v in host.items()}
  for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"):
    batch[k] = batch[k].long()
  losses = []

  def one_step():
    opt.zero_grad(set_to_none=True)
    logits = model(batch["images"], batch["image_mask"], batch["encoder_input_tokens"],
                   batch["decoder_input_tokens"])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                batch["decoder_target_tokens"].reshape(-1), reduction="none")
    w = batch["decoder_loss_weights"].reshape(-1)
    loss = (per_token * w).sum() / w.sum()
    loss.backward()
    opt.step()
    losses.append(loss.detach().item())  # eager CPU: the step is done when this returns

  t0 = time.perf_counter()
  one_step()
  first_step_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    one_step()
  times, cpu = [], []
  for _ in range(args.steps):
    c0, t0 = cpu_seconds(), time.perf_counter()
    one_step()
    times.append(time.perf_counter() - t0)
    cpu.append(cpu_seconds() - c0)
  peak = measure_matmul_peak(torch)

  gflop, gflop_source = step_gflop(args.batch, args.gflop_per_step)
  med = common.median(times)
  tokens = args.batch * (MAX_IMAGES * (IMAGE_SIZE // VIT["patch_size"]) ** 2
                         + INPUT_LEN + TARGET_LEN)
  row = {
      "config": "pytorch_reference" + (" (torch.compile)" if args.compile else " (eager)"),
      "dtype": "float32", "optimizer": "AdamW", "batch": args.batch, "image_size": IMAGE_SIZE,
      "input_len": INPUT_LEN, "target_len": TARGET_LEN, "steps": args.steps,
      "warmup": args.warmup, "threads": threads,
      "compile_s": first_step_s,  # first step: allocation/lazy init (+ torch.compile)
      "median_step_s": med, "min_step_s": min(times), "step_times_s": times,
      "cpu_s_per_step": sum(cpu) / len(cpu), "cpu_s_per_step_all": cpu,
      "examples_per_s": args.batch / med, "tokens_per_s": tokens / med,
      "gflop_per_step": gflop, "gflop_source": gflop_source,
      "achieved_gflop_per_s": gflop / med, "peak_matmul_dtype": "float32",
      "peak_gflop_per_s": peak / 1e9, "mfu": gflop * 1e9 / med / peak,
      "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
      "params": int(sum(p.numel() for p in model.parameters())),
      "vit_attn_implementation": getattr(vit_cfg, "_attn_implementation", None),
      "t5_attn_implementation": getattr(t5_cfg, "_attn_implementation", None),
  }
  machine = {
      "cpu_model": common.cpu_model_name(), "cpu_count": os.cpu_count(),
      "cpu_matmul_flags": common.cpu_matmul_flags(),
      "load_average_1_5_15min": common.load_average(),
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "torch_num_threads": torch.get_num_threads(),
      "torch_num_interop_threads": torch.get_num_interop_threads(),
      "mkldnn_enabled": torch.backends.mkldnn.is_available(),
      "ld_preload": os.environ.get("LD_PRELOAD", ""), "python": platform.python_version(),
  }
  return row, machine


def main(argv=None):
  args = parse_args(argv)
  row, machine = run(args)
  row["load_average_after"] = machine["load_average_1_5_15min"]
  cols = ["config", "dtype", "batch", "compile_s", "median_step_s", "cpu_s_per_step",
          "examples_per_s", "tokens_per_s", "achieved_gflop_per_s", "peak_gflop_per_s", "mfu",
          "load_average_after"]
  print(common.format_table([row], cols))
  print(f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f} over "
        f"{len(row['losses'])} steps; {row['gflop_per_step']:.1f} GFLOP/step "
        f"({row['gflop_source']}); compile_s = first step")
  print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
        f"{machine['torch_num_threads']} torch threads, torch {machine['torch_version']}, "
        f"transformers {machine['transformers_version']}")
  common.write_json(args.json, {"benchmark": "pytorch_reference_train_step",
                                "machine": machine, "results": [row]})
  return row


if __name__ == "__main__":
  main()
