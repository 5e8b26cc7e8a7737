"""Tests for fcp_jax.models.hf (Hugging Face import/export) and .vocab (vocabulary growth).

The references are tiny random Llama / Qwen2 models written by ``transformers`` in the
test itself (no download); their torch forward is the ground truth.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import hf as hf_lib
from fcp_jax.models import transformer as transformer_lib
from fcp_jax.models import vocab as vocab_lib

VOCAB = 96
TOL = 1e-4
LLAMA3 = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)


def make_hf_model(family: str, *, tie: bool, rope_scaling=None, seed: int = 0,
                  vocab: int = VOCAB):
  """A random tiny GQA model (4 query heads, 2 KV heads); every weight ~ N(0, 0.3)."""
  torch.manual_seed(seed)
  common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-5, tie_word_embeddings=tie, max_position_embeddings=256,
                attn_implementation="eager")
  if family == "llama":
    config = transformers.LlamaConfig(**common, rope_theta=5_000.0,
                                      rope_scaling=rope_scaling)
    model = transformers.LlamaForCausalLM(config)
  else:
    config = transformers.Qwen2Config(**common, rope_theta=20_000.0)
    model = transformers.Qwen2ForCausalLM(config)
  with torch.no_grad():
    for _, p in model.named_parameters():  # Biases too: random and nonzero.
      p.normal_(0.0, 0.3)
  return model.eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def our_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
  apply = jax.jit(transformer_lib.Transformer(cfg).apply)
  logits, _ = apply({"params": params}, jnp.asarray(ids))
  return np.asarray(logits)


def random_params(cfg, seed: int = 0):
  """Plain params of ``cfg`` (no compiled init): weights ~ N(0, 0.3), gains ~ 1 + N(0, 0.3)."""
  rs = np.random.RandomState(seed)

  def draw(path, spec):
    x = rs.normal(0.0, 0.3, spec.shape) + (path[-1].key == "scale")
    return jnp.asarray(x, spec.dtype)

  return jax.tree_util.tree_map_with_path(
      draw, nn.unbox(hf_lib.abstract_params(cfg)))


def torch_greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
  """Greedy decoding by full recomputation (no cache): the independent reference."""
  seq = torch.tensor(ids, dtype=torch.long)
  with torch.no_grad():
    for _ in range(n):
      nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
      seq = torch.cat([seq, nxt], dim=1)
  return seq[:, ids.shape[1]:].numpy()


def our_greedy(cfg, params, ids: np.ndarray, n: int) -> np.ndarray:
  """Greedy decoding with our KV cache: one prefill, then one token per step."""
  model = transformer_lib.Transformer(cfg)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  cache = transformer_lib.init_cache(cfg, ids.shape[0], ids.shape[1] + n)
  logits, cache = step(params, jnp.asarray(ids), cache)
  out = []
  for _ in range(n):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    out.append(np.asarray(token))
    logits, cache = step(params, token[:, None], cache)
  return np.stack(out, axis=1)


def random_ids(shape, vocab=VOCAB, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


# ------------------------------------------------------------------- import
IMPORT_CASES = {
    "llama-tied": dict(family="llama", tie=True),
    "llama-untied": dict(family="llama", tie=False),
    "qwen2-untied-bias": dict(family="qwen2", tie=False),
    "qwen2-tied-bias": dict(family="qwen2", tie=True),
    "llama3-rope": dict(family="llama", tie=False, rope_scaling=LLAMA3),
}


@pytest.mark.parametrize("case,scan_layers", [
    *[(case, False) for case in IMPORT_CASES],
    ("llama-tied", True), ("qwen2-untied-bias", True)])
def test_import_matches_transformers(tmp_path, case, scan_layers):
  hf_model = make_hf_model(**IMPORT_CASES[case])
  hf_model.save_pretrained(tmp_path)
  cfg, params = hf_lib.load_hf(str(tmp_path), scan_layers=scan_layers)

  kw = IMPORT_CASES[case]
  assert cfg.tie_embeddings == kw["tie"]
  assert cfg.qkv_bias == (kw["family"] == "qwen2")
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 8)
  assert cfg.rope_base == (5_000.0 if kw["family"] == "llama" else 20_000.0)
  assert cfg.norm_eps == 1e-5
  assert cfg.rope_scaling == (("llama3", 4.0, 1.0, 4.0, 64) if kw.get("rope_scaling")
                              else ())
  assert ("layers" in params) == scan_layers
  assert ("lm_head" in params) == (not kw["tie"])
  if cfg.qkv_bias:  # The biases really arrived (they are random, not zero).
    layer = params["layers"] if scan_layers else params["layers_0"]
    bias = np.asarray(layer["attn"]["q_proj"]["bias"])
    want = hf_model.model.layers[0].self_attn.q_proj.bias.detach().numpy()
    np.testing.assert_array_equal(bias[0] if scan_layers else bias, want)

  ids = random_ids((2, 40))
  np.testing.assert_allclose(our_logits(cfg, params, ids), torch_logits(hf_model, ids),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-tied", "qwen2-untied-bias", "llama3-rope"])
def test_greedy_generation_matches_transformers(tmp_path, case):
  hf_model = make_hf_model(**IMPORT_CASES[case])
  hf_model.save_pretrained(tmp_path)
  cfg, params = hf_lib.load_hf(str(tmp_path))
  ids = random_ids((2, 7), seed=1)
  want = torch_greedy(hf_model, ids, 20)
  got = our_greedy(cfg, params, ids, 20)
  np.testing.assert_array_equal(got, want)
  assert len(set(want.ravel().tolist())) > 3  # Not a degenerate constant sequence.


def test_import_accepts_transformers4_rope_keys(tmp_path):
  hf_model = make_hf_model("llama", tie=False, rope_scaling=LLAMA3)
  hf_model.save_pretrained(tmp_path)
  file = tmp_path / "config.json"
  hf = json.loads(file.read_text())
  params = hf.pop("rope_parameters")
  hf["rope_theta"] = params.pop("rope_theta")
  hf["rope_scaling"] = dict(params, type=params.pop("rope_type"))
  file.write_text(json.dumps(hf))
  cfg, _ = hf_lib.load_hf(str(tmp_path))
  assert cfg.rope_base == 5_000.0
  assert cfg.rope_scaling == ("llama3", 4.0, 1.0, 4.0, 64)


def test_boxed_and_sharded_import(tmp_path):
  hf_model = make_hf_model("qwen2", tie=False)
  hf_model.save_pretrained(tmp_path)
  cfg, _ = hf_lib.load_hf(str(tmp_path), scan_layers=True)
  abstract = hf_lib.abstract_params(cfg)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2),
                           ("data", "fsdp", "tensor"))
  rules = (("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"),
           ("kv_heads", "tensor"), ("mlp", "tensor"))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  cfg, params = hf_lib.load_hf(str(tmp_path), scan_layers=True, boxed=True,
                               shardings=shardings)

  # Same boxes and logical names as model.init.
  assert (jax.tree.structure(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
          == jax.tree.structure(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  assert nn.get_partition_spec(params) == nn.get_partition_spec(abstract)
  kernel = params["layers"]["attn"]["q_proj"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads")
  flat_params = jax.tree.leaves(nn.unbox(params))
  flat_shard = jax.tree.leaves(nn.unbox(shardings))
  for leaf, sharding in zip(flat_params, flat_shard):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  assert (nn.unbox(params)["embed"]["embedding"].sharding.spec
          == jax.sharding.PartitionSpec("tensor", "fsdp"))

  ids = random_ids((2, 16))
  np.testing.assert_allclose(our_logits(cfg, params, ids), torch_logits(hf_model, ids),
                             atol=TOL, rtol=0)


def test_import_dtype_bfloat16(tmp_path):
  make_hf_model("llama", tie=True).save_pretrained(tmp_path)
  cfg, params = hf_lib.load_hf(str(tmp_path), dtype="bfloat16", remat="full")
  assert cfg.param_dtype == cfg.dtype == "bfloat16" and cfg.remat == "full"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_import_into_ternary_config(tmp_path):
  from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
  hf_model = make_hf_model("qwen2", tie=False)
  hf_model.save_pretrained(tmp_path)
  cfg, params = hf_lib.load_hf(str(tmp_path), weight_quant="seq")
  assert "w_alpha" not in params["layers_0"]["attn"]["q_proj"]  # to be filled
  model = transformer_lib.Transformer(cfg)
  ids = random_ids((1, 12))
  params = jax.jit(lambda p, t: ternary_training.fill_quant_params(model, p, t))(
      params, ids)
  assert "w_alpha" in params["layers_0"]["attn"]["q_proj"]
  # λ = 0 is exactly the float model: the latent kernels are the checkpoint's.
  logits, _ = jax.jit(model.apply)({"params": params}, ids, qlambda=0.0)
  np.testing.assert_allclose(np.asarray(logits), torch_logits(hf_model, ids),
                             atol=TOL, rtol=0)


# ------------------------------------------------------------------- errors
def test_import_errors_name_the_culprit(tmp_path):
  make_hf_model("llama", tie=False).save_pretrained(tmp_path)
  path = str(tmp_path)
  with pytest.raises(ValueError, match=r"Tensor 'model\.layers\.0\.mlp\.(gate|up|down)"
                                       r"_proj\.weight' in .* has shape"):
    hf_lib.load_hf(path, mlp_dim=48)
  with pytest.raises(KeyError, match="nearest"):
    hf_lib.load_hf(path, not_a_field=1)

  # A tensor missing from the file.
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  tensors = load_file(tmp_path / "model.safetensors")
  del tensors["model.layers.1.self_attn.v_proj.weight"]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.self_attn\.v_proj"):
    hf_lib.load_hf(path)
  # A tensor the config has no place for.
  tensors["model.layers.1.self_attn.v_proj.weight"] = np.zeros((16, 32), np.float32)
  tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros((32,), np.float32)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"Unexpected tensor 'model\.layers\.1\.self_attn"
                                       r"\.o_proj\.bias' in .*model\.safetensors"):
    hf_lib.load_hf(path)

  # Unknown family / unsupported options in config.json.
  hf = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, model_type="gpt_neox")))
  with pytest.raises(KeyError, match="llama.*qwen2"):
    hf_lib.load_hf(path)
  (tmp_path / "config.json").write_text(json.dumps(dict(hf, attention_bias=True)))
  with pytest.raises(ValueError, match="attention_bias"):
    hf_lib.load_hf(path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="safetensors"):
    hf_lib.hf_weight_files(path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_lib.load_hf(str(tmp_path / "nowhere"))


def test_parse_size():
  assert hf_lib.parse_size("2GB") == 2 * 10**9
  assert hf_lib.parse_size("64KiB") == 65536
  assert hf_lib.parse_size(1234) == 1234
  with pytest.raises(ValueError, match="Cannot parse size"):
    hf_lib.parse_size("2 parsecs")
  with pytest.raises(ValueError, match="positive"):
    hf_lib.parse_size(0)


# ------------------------------------------------------------------- export
def our_random_model(*, qkv_bias=False, tie=True, rope_style="half", scan_layers=False,
                     seed=0):
  cfg = transformer_lib.get_variant(
      "tiny", vocab_size=VOCAB, qkv_bias=qkv_bias, tie_embeddings=tie,
      rope_style=rope_style, scan_layers=scan_layers, rope_base=10_000.0, norm_eps=1e-5)
  return cfg, random_params(cfg, seed)  # Nonzero biases, non-unit gains.


EXPORT_CASES = {
    "llama-tied": dict(),
    "qwen2-untied": dict(qkv_bias=True, tie=False),
    "interleaved-rope": dict(rope_style="interleaved", tie=False),
    "scan-layers": dict(qkv_bias=True, scan_layers=True),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_transformers(tmp_path, case):
  cfg, params = our_random_model(**EXPORT_CASES[case])
  files = hf_lib.save_hf(str(tmp_path), cfg, params)
  assert [os.path.basename(f) for f in files] == ["model.safetensors"]
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["model_type"] == ("qwen2" if cfg.qkv_bias else "llama")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  assert model.config.tie_word_embeddings == cfg.tie_embeddings
  ids = random_ids((2, 24), seed=3)
  np.testing.assert_allclose(torch_logits(model, ids), our_logits(cfg, params, ids),
                             atol=TOL, rtol=0)


def test_sharded_export_round_trip(tmp_path):
  cfg, params = our_random_model(qkv_bias=True, tie=False)
  files = hf_lib.save_hf(str(tmp_path), cfg, params, max_shard_size="12KB")
  assert len(files) > 2
  assert all(os.path.getsize(f) < 12_000 + 2_000 for f in files)  # + header
  index = json.loads((tmp_path / hf_lib.INDEX_FILE).read_text())
  plan = hf_lib.hf_param_plan(cfg)
  assert set(index["weight_map"]) == set(plan)
  assert sorted(set(index["weight_map"].values())) == sorted(
      os.path.basename(f) for f in files)
  assert index["metadata"]["total_size"] == sum(
      int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))

  # transformers reads the shards through the index ...
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager").eval()
  ids = random_ids((1, 20), seed=4)
  np.testing.assert_allclose(torch_logits(model, ids), our_logits(cfg, params, ids),
                             atol=TOL, rtol=0)
  # ... and so do we, bit for bit, into either layout.
  cfg2, params2 = hf_lib.load_hf(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  cfg3, params3 = hf_lib.load_hf(str(tmp_path), scan_layers=True)
  np.testing.assert_array_equal(params3["layers"]["mlp"]["up_proj"]["kernel"][1],
                                params["layers_1"]["mlp"]["up_proj"]["kernel"])

  # A later single-file save replaces the shards (no stale index shadowing it).
  hf_lib.save_hf(str(tmp_path), cfg, params)
  assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == [
      "model.safetensors"]


def test_export_bfloat16_and_tokenizer(tmp_path):
  cfg, params = our_random_model()
  tok = tiny_hf_tokenizer(VOCAB - 2)  # + <EF>, </EF> = VOCAB ids.
  assert tok.vocab_size == VOCAB
  hf_lib.save_hf(str(tmp_path), cfg, params, tok, dtype="bfloat16")
  hf = json.loads((tmp_path / "config.json").read_text())
  assert hf["dtype"] == "bfloat16"
  assert hf["eos_token_id"] == tok.im_end_id and hf["pad_token_id"] == tok.pad_id
  _, back = hf_lib.load_hf(str(tmp_path))
  want = np.asarray(params["layers_0"]["mlp"]["down_proj"]["kernel"])
  got = np.asarray(back["layers_0"]["mlp"]["down_proj"]["kernel"])
  np.testing.assert_array_equal(got, want.astype(jnp.bfloat16).astype(np.float32))
  assert not np.array_equal(got, want)  # really rounded

  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = "<|im_start|>w3 w7<EF>w1</EF><|im_end|>"
  assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)


def test_export_refuses_what_hf_cannot_hold(tmp_path):
  cfg, params = our_random_model()
  with pytest.raises(ValueError, match="strip_quant_params"):
    hf_lib.save_hf(str(tmp_path), cfg.replace(weight_quant="absmean"), params)
  with pytest.raises(ValueError, match="relu2"):
    hf_lib.save_hf(str(tmp_path), cfg.replace(mlp_activation="relu2"), params)
  extra = dict(params, extra={"scale": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"Without a Hugging Face counterpart: \['extra/"):
    hf_lib.save_hf(str(tmp_path), cfg, extra)
  with pytest.raises(ValueError, match="qwen2"):
    hf_lib.save_hf(str(tmp_path), cfg, params, family="qwen2")


def test_qk_permutation_is_llama_cpp_layout():
  # Head of 8 dims: HF rotates (x0, x4), (x1, x5), ...; interleaved pairs are adjacent.
  w = np.arange(16).reshape(16, 1)  # 2 heads x 8 rows
  perm = hf_lib.permute_qk(w, 2)[:, 0]
  np.testing.assert_array_equal(perm[:8], [0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(perm[8:], [8, 12, 9, 13, 10, 14, 11, 15])
  np.testing.assert_array_equal(hf_lib.unpermute_qk(hf_lib.permute_qk(w, 2), 2),
                                w)


# ------------------------------------------------------------ vocabulary growth
def tiny_hf_tokenizer(size: int) -> tokenizer_lib.HFTokenizer:
  """A word-level tokenizer of ``size`` ids with the ChatML specials (no <EF>)."""
  words = [tokenizer_lib.ENDOFTEXT, tokenizer_lib.IM_START, tokenizer_lib.IM_END]
  words += [f"w{i}" for i in range(size - len(words))]
  raw = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)},
                                       unk_token=tokenizer_lib.ENDOFTEXT))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
  raw.add_special_tokens([AddedToken(t, special=True) for t in words[:3]])
  return tokenizer_lib.HFTokenizer(raw)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_add_condition_tokens_keeps_old_logits(tmp_path, tie):
  make_hf_model("llama", tie=tie).save_pretrained(tmp_path)
  cfg, params = hf_lib.load_hf(str(tmp_path), boxed=not tie)
  tok = tiny_hf_tokenizer(VOCAB)
  assert tok.added_tokens == (tokenizer_lib.EF_OPEN, tokenizer_lib.EF_CLOSE)
  assert tok.vocab_size == VOCAB + 2

  tok2, cfg2, params2 = vocab_lib.add_condition_tokens(
      tok, cfg, params, jax.random.key(0), pad_to_multiple=64)
  assert tok2 is tok and cfg2.vocab_size == 128
  assert cfg2.replace(vocab_size=cfg.vocab_size) == cfg
  emb = np.asarray(nn.unbox(params2)["embed"]["embedding"])
  old = np.asarray(nn.unbox(params)["embed"]["embedding"])
  np.testing.assert_array_equal(emb[:VOCAB], old)
  assert np.all(np.abs(emb[VOCAB:VOCAB + 2]).sum(-1) > 0)
  np.testing.assert_array_equal(emb[VOCAB + 2:], 0.0)  # padding rows
  if not tie:
    assert isinstance(params2["lm_head"]["kernel"], nn.Partitioned)  # boxes kept
    head = np.asarray(nn.unbox(params2)["lm_head"]["kernel"])
    assert head.shape == (32, 128)
    np.testing.assert_array_equal(head[:, :VOCAB],
                                  np.asarray(nn.unbox(params)["lm_head"]["kernel"]))
    assert not np.allclose(head[:, VOCAB], emb[VOCAB])  # own moments, own draw

  text = tok.encode(" ".join(f"w{i}" for i in range(3, 40)))
  cond = tok.encode("<EF> w5 </EF> w6")  # The new tokens are single ids.
  assert cond[0] == VOCAB and cond[2] == VOCAB + 1
  before = our_logits(cfg, nn.unbox(params), np.asarray([text, text], np.int32))
  # Row 1 reads the new tokens, which the grown model can (finite logits).
  after = our_logits(cfg2, nn.unbox(params2),
                     np.asarray([text, (cond + text)[:len(text)]], np.int32))
  assert after.shape[-1] == 128 and np.all(np.isfinite(after))
  np.testing.assert_allclose(after[0, :, :VOCAB], before[0], atol=1e-5, rtol=0)


def test_add_condition_tokens_adds_missing_tokens_and_reinits():
  cfg = transformer_lib.get_variant("tiny", vocab_size=128)
  params = random_params(cfg)
  tok = tiny_hf_tokenizer(100)  # ids 100, 101 = <EF>, </EF>: inside a padded vocab
  old = np.asarray(params["embed"]["embedding"])

  _, cfg2, params2 = vocab_lib.add_condition_tokens(tok, cfg, params, jax.random.key(1))
  assert cfg2.vocab_size == 128
  np.testing.assert_array_equal(params2["embed"]["embedding"], old)

  tok3, _, params3 = vocab_lib.add_condition_tokens(
      tok, cfg, params, jax.random.key(1), tokens=("<EF>", "</EF>", "<X>"),
      reinit_existing=True)
  assert tok3 is not tok and tok3.token_to_id("<X>") == 102
  with pytest.raises(KeyError):
    tok.token_to_id("<X>")  # the tokenizer passed in is unchanged
  new = np.asarray(params3["embed"]["embedding"])
  changed = np.nonzero(np.any(new != old, axis=1))[0]
  np.testing.assert_array_equal(changed, [100, 101, 102])

  with pytest.raises(ValueError, match="CharTokenizer lacks"):
    vocab_lib.add_condition_tokens(tokenizer_lib.CharTokenizer(), cfg, params,
                                   jax.random.key(0), tokens=("<X>",))


def test_grow_vocab_samples_existing_moments():
  d, old_v, new = 6, 3000, 20_000
  rs = np.random.RandomState(0)
  a = rs.normal(size=(d, d))
  table = (rs.normal(size=(old_v, d)) @ a.T + rs.normal(size=d) * 3).astype(np.float32)
  cfg = transformer_lib.get_variant("tiny", vocab_size=old_v, embed_dim=d)
  params = {"embed": {"embedding": jnp.asarray(table)}}
  cfg2, grown = vocab_lib.grow_vocab(cfg, params, jax.random.key(0),
                                     vocab_size=old_v + new, pad_to_multiple=128)
  assert cfg2.vocab_size == -(-(old_v + new) // 128) * 128
  emb = np.asarray(grown["embed"]["embedding"])
  rows = emb[old_v:old_v + new].astype(np.float64)
  mean, cov = table.mean(0), np.cov(table.T, bias=True)
  sd = np.sqrt(np.diag(cov))
  assert np.all(np.abs(rows.mean(0) - mean) < 0.05 * sd)
  rel = np.linalg.norm(np.cov(rows.T) - cov) / np.linalg.norm(cov)
  assert rel < 0.05, rel
  np.testing.assert_array_equal(emb[old_v + new:], 0.0)
  # Seeded: the same key gives the same rows, another key other rows.
  grow = lambda seed: np.asarray(vocab_lib.grow_vocab(
      cfg, params, jax.random.key(seed), vocab_size=old_v + 5)[1]["embed"]["embedding"])
  np.testing.assert_array_equal(grow(0), grow(0))
  assert not np.allclose(grow(0)[old_v:], grow(1)[old_v:])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    vocab_lib.grow_vocab(cfg, params, jax.random.key(0), vocab_size=old_v,
                         init_ids=[old_v + 3])
