"""Sampler: padding invariance, filtered sampling sets, num_samples, end tokens, packed
ternary params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import packing
from fcp_jax.sampling import sampler as sampler_lib


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
