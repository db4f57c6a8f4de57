"""Loss values against hand computation; schedules; freezing keeps no optimizer state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pali.training import losses, optimizer


def test_cross_entropy_and_z_loss_by_hand():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
  targets = jnp.array([[0, 2]])
  weights = jnp.array([[1.0, 0.5]])
  loss, m = losses.compute_loss(logits, targets, weights, z_loss=1e-2)
  z0 = np.log(np.exp(2) + 2)
  z1 = np.log(np.e + 2)
  xent = (z0 - 2.0) * 1.0 + (z1 - 0.0) * 0.5
  zl = 1e-2 * (z0**2 * 1.0 + z1**2 * 0.5)
  np.testing.assert_allclose(loss, xent + zl, rtol=1e-6)
  np.testing.assert_allclose(m["z_loss"], zl, rtol=1e-6)
  assert float(m["correct"]) == 1.0  # first position right (weight 1), second wrong
  assert float(m["weight_sum"]) == 1.5


def test_correct_is_argmax_with_ties_counted_wrong():
  logits = jnp.array([[[0.0, 3.0, 1.0],     # target 1 is the unique max: right
                       [0.0, 3.0, 3.0],     # target 1 ties with 2: wrong (argmax would say right)
                       [2.0, 2.0, 2.0],     # all equal, target 0: wrong
                       [5.0, -1.0, 4.9],    # target 2 is second: wrong
                       [-7.0, -8.0, -6.5]]])  # all negative, target 2 is max: right
  targets = jnp.array([[1, 1, 0, 2, 2]])
  weights = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.25]])
  _, m = losses.compute_loss(logits, targets, weights)
  assert float(m["correct"]) == 1.25


def test_label_smoothing_perfect_prediction_scores_zero():
  # With smoothing s over V classes, the optimum distribution is the smoothed target itself.
  v, s = 4, 0.1
  q = np.full(v, s / (v - 1)); q[1] = 1 - s
  logits = jnp.log(jnp.asarray(q))[None, None]
  loss, _ = losses.compute_loss(logits, jnp.array([[1]]), jnp.ones((1, 1)), z_loss=0.0,
                                label_smoothing=s)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_rsqrt_schedule_values():
  sched = optimizer.learning_rate_schedule("rsqrt", base_learning_rate=0.01, warmup_steps=100)
  np.testing.assert_allclose(sched(50), 0.005, rtol=1e-6)      # linear warm-up
  np.testing.assert_allclose(sched(100), 0.01, rtol=1e-6)
  np.testing.assert_allclose(sched(400), 0.005, rtol=1e-6)     # 0.01 * sqrt(100/400)
  offset = optimizer.learning_rate_schedule("rsqrt", base_learning_rate=0.01, warmup_steps=100,
                                            step_offset=300)
  np.testing.assert_allclose(offset(100), sched(400), rtol=1e-6)  # continues across stages


def test_cosine_and_constant_schedules():
  cos = optimizer.learning_rate_schedule("cosine", base_learning_rate=1.0, warmup_steps=10,
                                         total_steps=110)
  np.testing.assert_allclose(cos(10), 1.0, rtol=1e-6)
  np.testing.assert_allclose(cos(60), 0.5, atol=1e-6)
  const = optimizer.learning_rate_schedule("constant", base_learning_rate=0.3, warmup_steps=0)
  np.testing.assert_allclose(const(1234), 0.3)
  with pytest.raises(ValueError, match="rsqrt"):
    optimizer.learning_rate_schedule("linear")


def _params():
  return {"vit": {"kernel": jnp.ones((256, 256)), "bias": jnp.ones((256,))},
          "encoder": {"kernel": jnp.ones((256, 256))}}


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_frozen_parameters_hold_no_optimizer_state_and_do_not_move(name):
  params = _params()
  tx = optimizer.create_optimizer(params, name=name, schedule=optax.constant_schedule(0.1),
                                  frozen_patterns=["^vit/"])
  state = tx.init(params)
  unfrozen = optimizer.create_optimizer({"encoder": params["encoder"]}, name=name,
                                        schedule=optax.constant_schedule(0.1))
  # Same optimizer-state size as if the ViT did not exist.
  size = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))  # noqa: E731
  assert size(state) == size(unfrozen.init({"encoder": params["encoder"]}))
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["vit"]["kernel"], params["vit"]["kernel"])
  assert not np.allclose(new["encoder"]["kernel"], params["encoder"]["kernel"])


def test_frozen_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="match no parameter"):
    optimizer.create_optimizer(_params(), frozen_patterns=["^nothing/"])


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_lr_multipliers_scale_each_parameters_update(name):
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  plain = optimizer.create_optimizer(params, name=name, schedule=optax.constant_schedule(0.1))
  scaled = optimizer.create_optimizer(params, name=name, schedule=optax.constant_schedule(0.1),
                                      lr_multipliers=[("^vit/kernel", 0.25), ("^vit/", 2.0)])
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(u_scaled["vit"]["kernel"], 0.25 * u_plain["vit"]["kernel"],
                             rtol=1e-6)  # the first matching rule wins
  np.testing.assert_allclose(u_scaled["vit"]["bias"], 2.0 * u_plain["vit"]["bias"], rtol=1e-6)
  np.testing.assert_array_equal(u_scaled["encoder"]["kernel"], u_plain["encoder"]["kernel"])
  size = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))  # noqa: E731
  assert size(scaled.init(params)) == size(plain.init(params))  # the scaling keeps no state


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_lr_multipliers_apply_beside_frozen_parameters(name):
  # multi_transform hands the optimizer trees with the frozen ViT masked out; the factors
  # must still find their parameters (a stage that freezes the ViT and scales the encoder).
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  frozen = optimizer.create_optimizer(params, name=name, schedule=optax.constant_schedule(0.1),
                                      frozen_patterns=["^vit/"])
  scaled = optimizer.create_optimizer(params, name=name, schedule=optax.constant_schedule(0.1),
                                      frozen_patterns=["^vit/"],
                                      lr_multipliers=[("^encoder/", 0.5)])
  u_frozen, _ = frozen.update(grads, frozen.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(u_scaled["encoder"]["kernel"], 0.5 * u_frozen["encoder"]["kernel"],
                             rtol=1e-6)
  assert not np.any(u_scaled["vit"]["kernel"]) and not np.any(u_scaled["vit"]["bias"])


def test_lr_multiplier_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"\['\^nothing/'\] match no parameter"):
    optimizer.create_optimizer(_params(), lr_multipliers=[("^vit/", 0.5), ("^nothing/", 0.5)])


def test_loc_targets_gaussian_by_hand():
  # Vocabulary of 6: ids 0-1 text, ids 2-5 four location bins. Target bin 1 (id 3), sigma 1.
  loc = losses.LocTargets(first=2, num=4, sigma=1.0)
  logits = jnp.array([[[0.5, -1.0, 0.2, 1.0, 0.3, -0.4], [0.5, -1.0, 0.2, 1.0, 0.3, -0.4]]])
  targets = jnp.array([[3, 1]])  # a loc target, then a text target (plain cross-entropy)
  weights = jnp.array([[1.0, 2.0]])
  loss, m = losses.compute_loss(logits, targets, weights, z_loss=0.0, loc_targets=loc)
  logp = np.asarray(jax.nn.log_softmax(logits[0, 0]))
  q = np.exp(-0.5 * (np.arange(4) - 1.0) ** 2); q /= q.sum()
  kl = float(np.sum(q * (np.log(q) - logp[2:])))
  np.testing.assert_allclose(loss, kl * 1.0 + (-logp[1]) * 2.0, rtol=1e-5)
  assert float(m["correct"]) == 1.0  # argmax of the loc row is id 3: right; the text row wrong


def test_loc_targets_perfect_prediction_scores_zero_and_small_sigma_is_one_hot():
  loc = losses.LocTargets(first=1, num=8, sigma=2.0)
  q = np.exp(-0.5 * ((np.arange(8) - 5.0) / 2.0) ** 2); q /= q.sum()
  logits = jnp.concatenate([jnp.full((1,), -1e4), jnp.log(jnp.asarray(q))])[None, None]
  loss, _ = losses.compute_loss(logits, jnp.array([[6]]), jnp.ones((1, 1)), z_loss=0.0,
                                loc_targets=loc)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 9)), jnp.float32)
  targets = jnp.array([[1, 4, 8], [0, 7, 3]])
  plain, _ = losses.compute_loss(logits, targets, jnp.ones((2, 3)), z_loss=0.0)
  sharp, _ = losses.compute_loss(logits, targets, jnp.ones((2, 3)), z_loss=0.0,
                                 loc_targets=losses.LocTargets(1, 8, 1e-3))
  np.testing.assert_allclose(sharp, plain, rtol=1e-5)
