"""Memory and FLOPs dry run of a training configuration on a mesh that need not exist.

Parameter shapes come from `jax.eval_shape(model.init)` (nothing is allocated), their shardings
from the ONE rules table (`pali.partitioning.logical_axis_rules`) applied on a
`jax.sharding.AbstractMesh`, the optimizer state's shapes from `jax.eval_shape(tx.init)` and its
shardings from `pali.training.train_state.opt_state_specs` (exactly what the trainer uses).
Per device it reports parameters, optimizer state, gradients, an analytic activation estimate
(with and without rematerialisation), the transient all-gathered weights of one layer and the
updated parameters that coexist with the old ones inside the step (its non-finite guard); FLOPs
per step come from `pali.flops` and give the step time at a stated MFU.

The activation model counts what the backward pass keeps per layer (inputs of norms and
matmuls, q/k/v, attention probabilities in float32 plus their compute-dtype copy, MLP hidden
states before and after the activation) at the compute dtype, with the batch split over the
batch mesh axes and heads/MLP/vocab over `tensor` as the rules say. 'full' remat keeps only
each layer's input and recomputes one layer at a time. XLA's own temporaries are not modelled:
a plan "fits" when the total stays under HBM minus a 10% reserve.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from pali import flops as flops_lib
from pali import partitioning
from pali.models import pali as pali_model
from pali.training import optimizer as optimizer_lib
from pali.training import train_state as train_state_lib

GiB = 1024 ** 3
RESERVE = 0.10  # HBM kept free for XLA temporaries and fragmentation


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  name: str
  hbm_gib: float
  peak_tflops: float  # dense bf16 matmul peak per device (per chip for TPUs)


DEVICES = {
    "tpu_v4": DeviceSpec("TPU v4", 32, 275),
    "tpu_v5e": DeviceSpec("TPU v5e", 16, 197),
    "tpu_v5p": DeviceSpec("TPU v5p", 95, 459),
    "tpu_v6e": DeviceSpec("TPU v6e", 32, 918),
    "a100_40gb": DeviceSpec("A100 40GB", 40, 312),
    "a100_80gb": DeviceSpec("A100 80GB", 80, 312),
    "h100": DeviceSpec("H100 80GB", 80, 989),
    "h200": DeviceSpec("H200 141GB", 141, 989),
}


@dataclasses.dataclass
class Plan:
  config: Any
  mesh: dict[str, int]
  device: DeviceSpec
  batch: int
  per_device_batch: float
  num_params: int
  params_bytes: float
  optimizer_bytes: float
  grads_bytes: float
  activations_bytes: float  # without remat
  activations_remat_bytes: float  # with 'full' remat on every stack
  gathered_weights_bytes: float
  update_bytes: float  # new parameters beside the old until the non-finite guard picks
  remat: bool
  flops_per_step: float
  mfu: float
  problems: list[str]

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def total_bytes(self) -> float:
    act = self.activations_remat_bytes if self.remat else self.activations_bytes
    return (self.params_bytes + self.optimizer_bytes + self.grads_bytes + act
            + self.gathered_weights_bytes + self.update_bytes)

  @property
  def fits(self) -> bool:
    return not self.problems and self.total_bytes <= (1 - RESERVE) * self.device.hbm_gib * GiB

  @property
  def step_seconds(self) -> float:
    return self.flops_per_step / (self.num_devices * self.device.peak_tflops * 1e12 * self.mfu)

  def report(self) -> str:
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    act_line = "with remat" if self.remat else "no remat"
    lines = [
        f"mesh {self.mesh} = {self.num_devices} x {self.device.name} "
        f"({self.device.hbm_gib:g} GiB HBM, {self.device.peak_tflops:g} TFLOP/s bf16)",
        f"parameters: {self.num_params / 1e9:.2f} B; global batch {self.batch} "
        f"({self.per_device_batch:g} per batch shard)",
        "per device:",
        f"  parameters (float32)          {g(self.params_bytes)}",
        f"  optimizer state               {g(self.optimizer_bytes)}",
        f"  gradients (float32)           {g(self.grads_bytes)}",
        f"  activations, no remat         {g(self.activations_bytes)}",
        f"  activations, full remat       {g(self.activations_remat_bytes)}",
        f"  gathered weights of a layer   {g(self.gathered_weights_bytes)}",
        f"  updated parameters (transient){g(self.update_bytes)}",
        f"  total ({act_line})       {g(self.total_bytes)} of "
        f"{(1 - RESERVE) * self.device.hbm_gib:.1f} GiB usable -> "
        f"{'FITS' if self.fits else 'DOES NOT FIT'}",
        f"model FLOPs per step: {self.flops_per_step:.3e}; step time at {self.mfu:.0%} MFU: "
        f"{self.step_seconds:.3f} s",
    ]
    lines += [f"problem: {p}" for p in self.problems]
    return "\n".join(lines)


def parse_mesh(text: str) -> dict[str, int]:
  """'data:64,fsdp:16,tensor:4' -> {'data': 64, 'fsdp': 16, 'tensor': 4} (missing axes: 1)."""
  mesh = {axis: 1 for axis in partitioning.MESH_AXES}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, size = part.partition(":")
    if name not in mesh or not size.isdigit() or int(size) < 1:
      raise ValueError(f"--mesh entry {part!r}: use axis:size with axes "
                       f"{partitioning.MESH_AXES}, e.g. data:64,fsdp:16,tensor:4.")
    mesh[name] = int(size)
  return mesh


def _shard_bytes(tree, specs, mesh: AbstractMesh, problems: list[str], what: str) -> float:
  total = 0.0
  flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(tree)[0], flat_specs):
    shape = tuple(leaf.shape)
    try:
      shard = NamedSharding(mesh, spec).shard_shape(shape)
    except ValueError:
      sizes = [math.prod(mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,)))
               if ax is not None else 1 for ax in tuple(spec) + (None,) * len(shape)]
      shard = tuple(-(-d // s) for d, s in zip(shape, sizes))
      problems.append(f"{what} {jax.tree_util.keystr(path)} {shape} is not divisible by "
                      f"{spec} on {dict(mesh.shape)}")
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _mesh_size(mesh: Mapping[str, int], rules, logical: str) -> int:
  spec = partitioning.logical_to_spec((logical,), rules)[0]
  axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
  return math.prod(mesh[a] for a in axes)


def _attention_bytes(q_len, kv_len, inner, heads, c, t, *, self_kv=True):
  """Saved activations of one attention block (per example): normed input, q, k, v, fp32
  probabilities + compute-dtype copy, attention output."""
  qkv = (q_len + 2 * kv_len) * inner * c / t
  probs = heads / t * q_len * kv_len * (4 + c)
  return qkv + probs + q_len * inner * c / t


def activation_bytes(config, *, per_device_examples: float, image_size: int, max_images: int,
                     input_len: int, target_len: int, tensor: int, vocab_split: int,
                     remat: bool) -> float:
  """Per-device activation bytes kept for the backward pass (see the module docstring)."""
  vit, t5 = config.vit, config.t5
  c_vit = jnp.dtype(vit.dtype).itemsize
  c_t5 = jnp.dtype(t5.dtype).itemsize
  t = tensor
  n = (image_size // vit.patch_size) ** 2
  s = max_images * n + input_len
  d, inner, ff, h = t5.d_model, t5.num_heads * t5.head_dim, t5.d_ff, t5.num_heads
  w, m = vit.width, vit.mlp_dim

  # Full per-layer activations (per example).
  norms_vit = (1 if vit.parallel_block else 2) * n * w * c_vit
  qk_norm = 2 * n * w * c_vit / t if vit.qk_norm else 0.0
  vit_layer = max_images * (norms_vit + qk_norm
                            + _attention_bytes(n, n, w, vit.num_heads, c_vit, t)
                            + 3 * n * m * c_vit / t)  # mlp input + pre/post GELU
  enc_layer = (2 * s * d * c_t5 + _attention_bytes(s, s, inner, h, c_t5, t)
               + s * d * c_t5 + 4 * s * ff * c_t5 / t)  # wi_0, wi_1, gelu, product
  dec_layer = (3 * target_len * d * c_t5 + _attention_bytes(target_len, target_len, inner, h,
                                                           c_t5, t)
               + _attention_bytes(target_len, s, inner, h, c_t5, t)
               + target_len * d * c_t5 + 4 * target_len * ff * c_t5 / t)
  logits = 3 * target_len * t5.vocab_size * 4 / vocab_split  # fp32 logits, softmax, grad
  inputs = max_images * n * w * c_vit + s * d * c_t5 + target_len * d * c_t5
  if remat:
    # Each layer keeps its input; the backward recomputes one layer at a time.
    kept = (vit.depth * max_images * n * w * c_vit + t5.num_encoder_layers * s * d * c_t5
            + t5.num_decoder_layers * target_len * d * c_t5)
    per_example = kept + max(vit_layer, enc_layer, dec_layer) + logits + inputs
  else:
    per_example = (vit.depth * vit_layer + t5.num_encoder_layers * enc_layer
                   + t5.num_decoder_layers * dec_layer + logits + inputs)
  return per_example * per_device_examples


def _layer_params(config) -> dict[str, float]:
  vit, t5 = config.vit, config.t5
  inner = t5.num_heads * t5.head_dim
  return {
      "vit": 4 * vit.width ** 2 + 2 * vit.width * vit.mlp_dim,
      "encoder": 4 * t5.d_model * inner + 3 * t5.d_model * t5.d_ff,
      "decoder": 6 * t5.d_model * inner + 3 * t5.d_model * t5.d_ff,
  }


def plan(config, mesh: Mapping[str, int], device: str | DeviceSpec, *, batch: int,
         image_size: int, input_len: int, target_len: int, max_images: int = 1,
         optimizer: str = "adafactor", remat: bool | None = None, mfu: float = 0.5,
         frozen_patterns: tuple[str, ...] = (), rules=None) -> Plan:
  """The memory/FLOPs plan of one training step of `config` (a PaliConfig)."""
  dev = DEVICES[device] if isinstance(device, str) else device
  mesh = {a: int(mesh.get(a, 1)) for a in partitioning.MESH_AXES}
  rules = rules or partitioning.logical_axis_rules()
  problems: list[str] = []
  grid = image_size // config.vit.patch_size
  if image_size % config.vit.patch_size:
    problems.append(f"image size {image_size} is not divisible by the patch size "
                    f"{config.vit.patch_size}")
  if config.vit.posemb_grid != grid:  # the trainer sizes the learned table for the image size
    config = dataclasses.replace(config, vit=dataclasses.replace(config.vit, posemb_grid=grid))
  model = pali_model.build_model(config)
  dummy = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in
           pali_model.dummy_batch(1, image_size, max_images, input_len, target_len).items()}

  def init(rng, b):
    return model.init({"params": rng, "dropout": rng}, b, train=False)["params"]

  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(0), dummy)
  param_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  params = train_state_lib.unbox_abstract(boxed)
  tx = optimizer_lib.create_optimizer(params, name=optimizer,
                                      schedule=optax.constant_schedule(1e-3),
                                      frozen_patterns=tuple(frozen_patterns))
  opt_state = jax.eval_shape(tx.init, params)
  opt_specs = train_state_lib.opt_state_specs(opt_state, param_specs, params)

  abstract_mesh = AbstractMesh(tuple(mesh.values()), tuple(mesh))
  params_bytes = _shard_bytes(params, param_specs, abstract_mesh, problems, "parameter")
  opt_bytes = _shard_bytes(opt_state, opt_specs, abstract_mesh, [], "optimizer state")

  batch_split = _mesh_size(mesh, rules, "batch")
  tensor = _mesh_size(mesh, rules, "act_heads")
  if batch % batch_split:
    problems.append(f"batch {batch} is not divisible by the {batch_split} batch shards")
  per_device_examples = batch / batch_split
  act_kw = dict(per_device_examples=per_device_examples, image_size=image_size,
                max_images=max_images, input_len=input_len, target_len=target_len,
                tensor=tensor, vocab_split=_mesh_size(mesh, rules, "vocab"))
  configured_remat = (config.vit.remat_policy != "none" or config.t5.remat_policy != "none")
  compute = max(jnp.dtype(config.vit.dtype).itemsize, jnp.dtype(config.t5.dtype).itemsize)
  # FSDP gathers one layer's weights (still split over `tensor`), double-buffered.
  gathered = 2 * max(_layer_params(config).values()) / _mesh_size(mesh, rules, "mlp") * compute
  frozen_vit = bool(frozen_patterns) and flops_lib.vit_is_frozen(
      optimizer_lib.frozen_mask(params, frozen_patterns))
  step_flops = flops_lib.train_step_flops(
      config, flops_lib.BatchShapes(batch, image_size, max_images, input_len, target_len),
      frozen_vit=frozen_vit)
  return Plan(
      config=config, mesh=mesh, device=dev, batch=batch, per_device_batch=per_device_examples,
      num_params=pali_model.count_params(params), params_bytes=params_bytes,
      optimizer_bytes=opt_bytes, grads_bytes=params_bytes,
      activations_bytes=activation_bytes(config, remat=False, **act_kw),
      activations_remat_bytes=activation_bytes(config, remat=True, **act_kw),
      gathered_weights_bytes=gathered, update_bytes=params_bytes,
      remat=configured_remat if remat is None else remat, flops_per_step=step_flops, mfu=mfu,
      problems=problems)
