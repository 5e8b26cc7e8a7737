"""Losses: masked NLL against a numpy reference, masking of gradients, GRPO pieces,
the chunked vocabulary projection against full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.data import chat
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import transformer as tfm
from fcp_jax.training import losses
from fcp_jax.training import step as step_lib

B, T, V = 3, 7, 11


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  logits = rs.randn(B, T, V).astype(np.float32)
  tokens = rs.randint(0, V, (B, T)).astype(np.int32)
  loss_mask = np.zeros((B, T), np.float32)
  loss_mask[0, 3:7] = 1   # response tokens 3..6, but 6 is padding
  loss_mask[1, 1:7] = 1   # response tokens 1..6
  loss_mask[2, 5:6] = 1   # one token
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[0, 6] = 0   # padding
  return logits, dict(tokens=tokens, loss_mask=loss_mask, segment_ids=segment_ids)


def _reference_nll(logits, batch):
  """Per-target NLL [B, T-1] and target mask, written independently in numpy."""
  logp = _log_softmax(logits)
  nll = np.zeros((B, T - 1))
  mask = np.zeros((B, T - 1))
  for b in range(B):
    for t in range(1, T):
      nll[b, t - 1] = -logp[b, t - 1, batch["tokens"][b, t]]
      mask[b, t - 1] = batch["loss_mask"][b, t] * (batch["segment_ids"][b, t] != 0)
  return nll, mask


def test_nll_token_mean_matches_hand_computed():
  logits, batch = _batch()
  nll, mask = _reference_nll(logits, batch)
  expected = (nll * mask).sum() / mask.sum()
  assert mask.sum() == 10  # 3 + 6 + 1: padding at [0, 6] is not a target.
  loss = losses.build("fcp")
  m = losses.finalize_metrics(loss(jnp.asarray(logits), loss.prepare(batch)))
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-6)
  assert float(m["tokens"]) == 10
  assert float(m["sequences"]) == 3
  correct = (np.argmax(logits[:, :-1], -1) == batch["tokens"][:, 1:]) * mask
  np.testing.assert_allclose(float(m["accuracy"]), correct.sum() / 10, rtol=1e-6)


def test_nll_seq_mean_token_sum():
  logits, batch = _batch(1)
  nll, mask = _reference_nll(logits, batch)
  expected = np.mean([(nll[b] * mask[b]).sum() for b in range(B)])
  loss = losses.build("nll(aggregation='seq-mean-token-sum')")
  m = losses.finalize_metrics(loss(jnp.asarray(logits), batch))
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-6)


def test_packed_segments_do_not_predict_across_boundary():
  logits, batch = _batch(2)
  batch["segment_ids"] = np.array([[1, 1, 1, 2, 2, 2, 2]] * B, np.int32)
  batch["loss_mask"] = np.array([[0, 1, 1, 1, 0, 1, 1]] * B, np.float32)
  mask = np.asarray(losses.target_mask(batch))
  # Token 3 starts segment 2: it is not predicted from token 2 of segment 1.
  np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 1, 1])
  assert float(losses.count_sequences(jnp.asarray(mask))) == 2 * B


def test_masked_positions_get_no_gradient():
  logits, batch = _batch(3)
  loss = losses.build("nll")
  grad = jax.grad(lambda l: losses.finalize_metrics(loss(l, batch))["loss"])(
      jnp.asarray(logits))  # [B, T, V]
  _, mask = _reference_nll(logits, batch)
  per_position = np.abs(np.asarray(grad)).sum(-1)  # [B, T]
  # Logits at position t predict token t+1: trained iff target t+1 is in the mask.
  trained = np.concatenate([mask, np.zeros((B, 1))], axis=1) > 0
  assert np.all(per_position[~trained] == 0.0)
  assert np.all(per_position[trained] > 0.0)


def test_fcp_feedback_and_prompt_tokens_get_no_gradient():
  tok = tokenizer_lib.CharTokenizer()
  tokens, mask = chat.encode_example(tok, "2+3?", "Clear and correct.", "2+3=5\n#### 5")
  batch = chat.pad_rows([(tokens, mask)], tok.pad_id, max_len=len(tokens) + 3)
  rs = np.random.RandomState(0)
  logits = jnp.asarray(rs.randn(1, batch["tokens"].shape[1], tok.vocab_size), jnp.float32)
  loss = losses.build("fcp")
  grad = np.asarray(jax.grad(
      lambda l: losses.finalize_metrics(loss(l, batch))["loss"])(logits))[0]  # [T, V]
  response_start = int(np.argmax(np.asarray(mask) > 0))
  n = len(tokens)
  # Positions before response_start - 1 predict prompt/feedback tokens: no gradient.
  assert np.all(grad[:response_start - 1] == 0.0)
  # Position n-1 (last real token) and padding predict nothing.
  assert np.all(grad[n - 1:] == 0.0)
  assert np.all(np.abs(grad[response_start - 1:n - 1]).sum(-1) > 0)
  # The hand-computed loss: mean NLL of the response tokens (+ closing <|im_end|>).
  logp = _log_softmax(np.asarray(logits))[0]
  expected = np.mean([-logp[t - 1, tokens[t]] for t in range(response_start, n)])
  m = losses.finalize_metrics(loss(logits, batch))
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-6)
  assert tokens[n - 1] == tok.im_end_id and float(m["tokens"]) == n - response_start


def test_grpo_advantages_match_numpy():
  scores = np.array([1.0, 0.0, 0.5, 0.5, 3.0, 1.0, 2.0, 2.0], np.float32)
  adv = np.asarray(losses.grpo_advantages(jnp.asarray(scores), 4, eps=1e-6))
  groups = scores.reshape(2, 4).astype(np.float64)
  expected = ((groups - groups.mean(1, keepdims=True))
              / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(adv, expected, rtol=1e-5)
  np.testing.assert_allclose(adv.reshape(2, 4).sum(1), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="group_size=3"):
    losses.grpo_advantages(jnp.asarray(scores), 3)


def test_grpo_loss_matches_numpy_reference():
  logits, batch = _batch(4)
  rs = np.random.RandomState(5)
  batch.update(old_logprobs=rs.randn(B, T).astype(np.float32) * 0.1 - 2.0,
               ref_logprobs=rs.randn(B, T).astype(np.float32) * 0.1 - 2.0,
               advantages=np.array([1.0, -0.5, 2.0], np.float32))
  loss = losses.build("grpo(clip_eps=0.2, kl_coef=0.1)")
  m = losses.finalize_metrics(loss(jnp.asarray(logits), loss.prepare(batch)))

  nll, mask = _reference_nll(logits, batch)
  logp = -nll
  ratio = np.exp(logp - batch["old_logprobs"][:, 1:])
  adv = batch["advantages"][:, None]
  surrogate = np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
  q = batch["ref_logprobs"][:, 1:] - logp
  kl = np.exp(q) - q - 1
  expected = ((-surrogate + 0.1 * kl) * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(m["loss"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(m["kl"]), (kl * mask).sum() / mask.sum(), rtol=1e-5)


def test_grpo_on_policy_gradient_is_advantage_weighted_nll():
  logits, batch = _batch(6)
  batch["scores"] = np.array([0.0, 1.0, 1.0], np.float32)
  with pytest.raises(ValueError, match="group_size"):
    losses.build("grpo").prepare(batch)
  batch["advantages"] = np.array([1.5, -1.0, 0.5], np.float32)
  del batch["scores"]
  grpo = losses.build("grpo")
  g1 = jax.grad(lambda l: losses.finalize_metrics(
      grpo(l, grpo.prepare(batch)))["loss"])(jnp.asarray(logits))
  # On-policy (ratio 1): d/dθ of -A * logp, i.e. the NLL gradient weighted by A.
  _, mask = _reference_nll(logits, batch)

  def weighted_nll(l):
    logp = losses.token_logprobs(l, jnp.asarray(batch["tokens"]))
    a = jnp.asarray(batch["advantages"])[:, None]
    return -jnp.sum(a * logp * mask) / mask.sum()

  g2 = jax.grad(weighted_nll)(jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-7)


def test_bad_specs_and_batches_raise_clear_errors():
  with pytest.raises(KeyError, match="Registered: .*fcp.*grpo"):
    losses.build("fpc")
  with pytest.raises(ValueError, match="aggregation"):
    losses.build("nll(aggregation='mean')")
  with pytest.raises(ValueError, match="Bad loss spec"):
    losses.build("nll(smoothing=0.1)")
  _, batch = _batch()
  del batch["loss_mask"]
  with pytest.raises(KeyError, match="loss_mask"):
    losses.build("nll").prepare(batch)
  with pytest.raises(KeyError, match="ref_logprobs"):
    _, b2 = _batch()
    b2["advantages"] = np.zeros(B, np.float32)
    losses.build("grpo(kl_coef=0.1)").prepare(b2)


@pytest.mark.parametrize("chunk", [1, 4, 6, 10])  # T-1 = 6: padded for 4, one chunk for 10.
def test_chunked_target_stats_match_full_logits(chunk):
  _, batch = _batch(7)
  rs = np.random.RandomState(8)
  hidden = jnp.asarray(rs.randn(B, T, 5), jnp.float32)  # [B, T, D]
  w = jnp.asarray(rs.randn(5, V), jnp.float32)  # [D, V]
  tokens = jnp.asarray(batch["tokens"])
  mask = losses.target_mask(batch)

  def objective(stats_fn, h, w):
    logp, correct = stats_fn(h, w)  # [B, T-1] each
    return jnp.sum(logp * mask), (logp, correct)

  full = lambda h, w: losses.target_stats(h @ w, tokens)
  chunked = lambda h, w: losses.chunked_target_stats(h, tokens, lambda x: x @ w, chunk)
  grad = jax.grad(objective, argnums=(1, 2), has_aux=True)
  ref_grads, (ref_logp, ref_correct) = grad(full, hidden, w)
  grads, (logp, correct) = grad(chunked, hidden, w)
  assert logp.shape == correct.shape == (B, T - 1)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(correct, ref_correct)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,tie", [("nll", True), ("grpo(kl_coef=0.1)", False)])
def test_model_loss_chunk_matches_full_logits(spec, tie):
  """Loss terms, their gradients and the log-prob step, with and without ``loss_chunk``."""
  cfg, model, params = testing.tiny_model(tie_embeddings=tie)
  chunked = tfm.Transformer(cfg.replace(loss_chunk=3))  # T-1 = 8: the last chunk padded.
  rs = np.random.RandomState(9)
  tokens = rs.randint(1, cfg.vocab_size, (2, 9)).astype(np.int32)
  segments = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
  positions = np.array([[0, 0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 0, 1, 2, 3, 4]], np.int32)
  batch = dict(tokens=tokens, segment_ids=segments, positions=positions,
               loss_mask=(segments > 0) * 1.0, advantages=np.array([1.0, -0.5], np.float32),
               ref_logprobs=rs.randn(2, 9).astype(np.float32) * 0.1 - 4.0)
  loss = losses.build(spec)

  def terms_and_grads(m):
    eval_step = step_lib.make_eval_step(m, loss, return_terms=True)

    def numerator(p):
      terms = eval_step(p, batch)
      return terms.numerator, terms

    grads, terms = jax.jit(jax.grad(numerator, has_aux=True))(params)
    logprobs = jax.jit(step_lib.make_logprob_step(m))(params, batch)  # [B, T]
    return terms, grads, logprobs

  ref = terms_and_grads(model)
  out = terms_and_grads(chunked)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out),
                          jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_bad_loss_chunk_raises():
  with pytest.raises(ValueError, match="loss_chunk must be >= 0"):
    tfm.get_variant("tiny", loss_chunk=-1)
