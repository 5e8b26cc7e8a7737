"""Sampler: padding invariance, filtered sampling sets, num_samples, end tokens, packed
ternary params; samples for a fixed seed pinned, and equal to categorical draws on the
full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import packing
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib


@pytest.fixture(scope="module")
def setup():
  cfg, model, params = testing.tiny_model(seed=3)
  tok = testing.char_tokenizer()
  return model, params, tok, sampler_lib.Sampler(model, tok, prompt_bucket=8)


@pytest.mark.slow
def test_greedy_left_padded_batch_equals_single_prompts(setup):
  model, params, tok, sampler = setup
  prompts = ["12+7=", "a much longer prompt here", "x"]
  batch = sampler.sample(params, prompts, jax.random.PRNGKey(0), max_new_tokens=12)
  for i, p in enumerate(prompts):
    alone = sampler.sample(params, [p], jax.random.PRNGKey(0), max_new_tokens=12)
    np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
    np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
    assert batch.text[i] == alone.text[0]


@pytest.mark.slow
def test_greedy_matches_argmax_of_full_forward(setup):
  model, params, tok, sampler = setup
  prompt = tok.encode("3+4=")
  out = sampler.sample(params, [prompt], jax.random.PRNGKey(0), max_new_tokens=6)
  seq = list(prompt)
  apply = jax.jit(model.apply)
  for step in range(6):
    logits, _ = apply({"params": params}, jnp.array([seq]))
    logits = logits[0, -1, :tok.vocab_size]
    nxt = int(jnp.argmax(logits))
    assert out.tokens[0, step] == nxt
    np.testing.assert_allclose(out.logprobs[0, step],
                               jax.nn.log_softmax(logits)[nxt], atol=1e-4)
    if nxt in tok.eos_ids:
      break
    seq.append(nxt)


# Sampler.sample(tiny_model(seed=3), ["12+7=", "a longer prompt", "x"], PRNGKey(5),
# max_new_tokens=10, method="temperature(t=1.0)", num_samples=2) as recorded before the
# decoding loop drew its Gumbel noise up front and the cache became [B, K, S, H].
PINNED_TOKENS = [[87, 33, 80, 74, 15, 42, 33, 101, 92, 30],
                 [99, 30, 27, 50, 18, 76, 55, 38, 71, 2],
                 [30, 20, 61, 31, 15, 13, 97, 95, 4, 57],
                 [98, 81, 95, 75, 55, 99, 31, 19, 72, 69],
                 [67, 79, 18, 68, 54, 78, 102, 18, 27, 58],
                 [71, 22, 100, 99, 55, 22, 65, 56, 41, 69]]
PINNED_LOGPROB_SUMS = [-47.02194, -46.19915, -46.61395, -46.22267, -45.878, -46.38131]


def _pinned_call(sampler, params):
  return sampler.sample(params, ["12+7=", "a longer prompt", "x"], jax.random.PRNGKey(5),
                        max_new_tokens=10, method="temperature(t=1.0)", num_samples=2)


def test_samples_for_a_fixed_seed_are_unchanged(setup):
  model, params, tok, sampler = setup
  out = _pinned_call(sampler, params)
  np.testing.assert_array_equal(out.tokens, PINNED_TOKENS)
  np.testing.assert_array_equal(out.lengths, [10] * 6)
  np.testing.assert_allclose(out.logprobs.sum(1), PINNED_LOGPROB_SUMS, atol=1e-4)


@pytest.mark.parametrize("parallel,row_shards", [
    (dict(mode="mesh", mesh_shape=(-1, 1, 1)), 8),
    (dict(mode="mesh", mesh_shape=(2, 2, 2)), 4),  # data x fsdp rows; tensor-split heads
    (dict(mode="pmap"), 8)], ids=["data8", "d2f2t2", "pmap"])
def test_rows_split_over_devices_sample_the_pinned_tokens(setup, parallel, row_shards):
  """With ``parallel`` the rows (3 prompts, padded to the row shards) are decoded on
  their devices, params placed by the strategy (FSDP/tensor-sharded in d2f2t2), and the
  samples are the single-device ones."""
  model, params, tok, _ = setup
  par = sharding.build(parallel)
  placed = jax.device_put(params, par.shardings(state_lib.param_logical_specs(model)))
  sampler = sampler_lib.Sampler(model, tok, prompt_bucket=8, parallel=par)
  assert sampler.row_shards == row_shards
  out = _pinned_call(sampler, placed)
  np.testing.assert_array_equal(out.tokens, PINNED_TOKENS)
  np.testing.assert_array_equal(out.prompt_index, [0, 0, 1, 1, 2, 2])
  np.testing.assert_allclose(out.logprobs.sum(1), PINNED_LOGPROB_SUMS, atol=1e-4)
  # The decoding state is split over the row shards: each device holds its rows only.
  tokens, segments = sampler.left_pad([tok.encode(p) for p in ["12+7=", "x"]])
  with par.context():
    state = sampler.jitted("greedy", 4, 2)["prefill"](
        placed, sampler.place_rows(tokens), sampler.place_rows(segments), None)
    state = sampler.jitted("greedy", 4, 2)["decode"](placed, state,
                                                     jax.random.PRNGKey(0), None)
  for rows in (state["out"], state["logprobs"], state["cache"]["segment_ids"]):
    assert rows.shape[0] == sampler.row_shards * 2  # [row_shards * 2, ...]
    assert {s.data.shape[0] for s in rows.addressable_shards} == {2}


def test_short_batch_padded_to_min_prompts_reuses_the_program(setup):
  """A last chunk of 2 prompts padded to 3 runs the 3-prompt program (no compile) and
  samples what the first 2 prompts' rows of the 3-prompt call sampled."""
  model, params, tok, _ = setup
  sampler = sampler_lib.Sampler(model, tok, prompt_bucket=8)
  full = _pinned_call(sampler, params)
  short = sampler.sample(params, ["12+7=", "a longer prompt"], jax.random.PRNGKey(5),
                         max_new_tokens=10, method="temperature(t=1.0)", num_samples=2,
                         min_prompts=3)
  fns = sampler.jitted("temperature(t=1.0)", 10, 2)
  assert fns["prefill"]._cache_size() == fns["decode"]._cache_size() == 1
  assert short.tokens.shape == (4, 10) and len(short.text) == 4
  np.testing.assert_array_equal(short.tokens, full.tokens[:4])
  np.testing.assert_array_equal(short.logprobs, full.logprobs[:4])
  np.testing.assert_array_equal(short.prompt_index, [0, 0, 1, 1])


def test_noise_drawn_per_step_equals_noise_drawn_up_front(setup, monkeypatch):
  model, params, tok, _ = setup
  up_front = _pinned_call(sampler_lib.Sampler(model, tok, prompt_bucket=8), params)
  monkeypatch.setattr(sampler_lib, "NOISE_BYTES", 0)  # Too small: one draw per step.
  per_step = _pinned_call(sampler_lib.Sampler(model, tok, prompt_bucket=8), params)
  np.testing.assert_array_equal(per_step.tokens, up_front.tokens)
  np.testing.assert_array_equal(per_step.logprobs, up_front.logprobs)


@pytest.mark.parametrize("method", ["temperature(t=1.0)", "top_p(p=0.9, t=0.8)"])
def test_sampled_tokens_match_categorical_on_the_full_forward(setup, method):
  """Cached decoding draws what jax.random.categorical(fold_in(rng, step)) draws from
  the logits of a full forward pass over the prompt and the tokens drawn so far."""
  model, params, tok, sampler = setup
  prompts, n, steps, rng = ["3+4=", "9-2="], 2, 6, jax.random.PRNGKey(4)
  out = sampler.sample(params, prompts, rng, max_new_tokens=steps, method=method,
                       num_samples=n)
  pick = sampler_lib.SAMPLING_METHODS.build(method)
  seqs = np.repeat(np.array([tok.encode(p) for p in prompts]), n, axis=0)  # [R, P]
  apply = jax.jit(model.apply)
  done = np.zeros(len(seqs), bool)  # [R] rows that emitted an end token
  for step in range(steps):
    logits, _ = apply({"params": params}, jnp.asarray(seqs))
    logits = logits[:, -1].at[:, tok.vocab_size:].set(sampler_lib._NEG)  # [R, V]
    token = np.asarray(pick(logits, jax.random.fold_in(rng, step)))  # [R]
    logp = np.take_along_axis(jax.nn.log_softmax(logits), token[:, None], 1)[:, 0]
    np.testing.assert_array_equal(out.tokens[:, step], np.where(done, tok.pad_id, token))
    np.testing.assert_allclose(out.logprobs[:, step], np.where(done, 0.0, logp), atol=1e-5)
    done |= np.isin(token, tok.eos_ids)
    seqs = np.concatenate([seqs, token[:, None]], axis=1)
  np.testing.assert_array_equal(out.lengths, [
      steps if not d else list(np.isin(r, tok.eos_ids)).index(True) + 1
      for r, d in zip(out.tokens, done)])


def test_num_samples_gives_distinct_rows_per_prompt(setup):
  model, params, tok, sampler = setup
  out = sampler.sample(params, ["ab", "cd"], jax.random.PRNGKey(1), max_new_tokens=10,
                       method="temperature(t=1.0)", num_samples=4)
  assert out.tokens.shape == (8, 10)
  np.testing.assert_array_equal(out.prompt_index, [0, 0, 0, 0, 1, 1, 1, 1])
  for i in range(2):
    rows = {tuple(r) for r in out.tokens[4 * i:4 * i + 4]}
    assert len(rows) == 4
  assert (out.tokens < tok.vocab_size).all()  # Padded vocab ids are never sampled.


@pytest.mark.slow
def test_end_token_stops_row_and_pads_after():
  cfg, model, params = testing.tiny_model(seed=0)
  # Make token 7 overwhelmingly likely so every row ends right away.
  params = jax.tree.map(lambda x: x, params)
  params["embed"]["embedding"] = params["embed"]["embedding"].at[7].mul(200.0)
  sampler = sampler_lib.Sampler(model, end_ids=(7,), pad_id=0)
  out = sampler.sample(params, [[1, 2, 3], [4, 5]], jax.random.PRNGKey(0),
                       max_new_tokens=5)
  for row, n in zip(out.tokens, out.lengths):
    assert 7 in row.tolist()
    first = row.tolist().index(7)
    assert n == first + 1
    assert (row[first + 1:] == 0).all()
    assert (out.logprobs[0, n:] == 0).all()


@pytest.mark.parametrize("weight_quant, act_quant", [
    ("absmean", "absmax_int8"), ("tequila(group_size=16)", "none")])
def test_greedy_on_prepared_packed_params_matches_latent_params(weight_quant, act_quant):
  cfg, model, params = testing.tiny_model(seed=3, weight_quant=weight_quant,
                                          act_quant=act_quant)
  prepared = packing.prepare_for_inference(packing.pack_params(params, cfg), cfg)
  assert "codes_u32" in prepared["layers_0"]["mlp"]["down_proj"]
  sampler = sampler_lib.Sampler(model, testing.char_tokenizer(), prompt_bucket=8)
  prompts = ["12+7=", "a longer prompt", "x"]
  latent = sampler.sample(params, prompts, jax.random.PRNGKey(0), max_new_tokens=12)
  packed = sampler.sample(prepared, prompts, jax.random.PRNGKey(0), max_new_tokens=12)
  assert latent.lengths.max() > 1
  np.testing.assert_array_equal(packed.tokens, latent.tokens)
  np.testing.assert_array_equal(packed.lengths, latent.lengths)
  np.testing.assert_allclose(packed.logprobs, latent.logprobs, atol=1e-4)


def _allowed_frequencies(method, logits, n=4000):
  pick = sampler_lib.SAMPLING_METHODS.build(method)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  draws = jax.vmap(lambda k: pick(logits[None], k)[0])(keys)
  return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_top_k_and_top_p_never_leave_the_allowed_set():
  probs = jnp.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
  logits = jnp.log(probs)
  freq = _allowed_frequencies("top_k(k=2)", logits)
  assert freq[2:].sum() == 0 and freq[0] > 0 and freq[1] > 0
  np.testing.assert_allclose(freq[0], 0.35 / 0.6, atol=0.03)
  # Nucleus p=0.7: mass before token 2 is 0.6 < 0.7, before token 3 is 0.8 -> {0,1,2}.
  freq = _allowed_frequencies("top_p(p=0.7)", logits)
  assert freq[3:].sum() == 0 and (freq[:3] > 0).all()
  freq = _allowed_frequencies("top_p(p=0.1)", logits)
  assert freq[0] == 1.0
  np.testing.assert_array_equal(
      np.asarray(sampler_lib.top_p_logits(logits[None], 0.7)[0] > -1e29),
      [True, True, True, False, False, False])


def test_unknown_method_lists_options():
  with pytest.raises(KeyError, match="greedy"):
    sampler_lib.SAMPLING_METHODS.build("nucleus(p=0.9)")
