"""Decoder-only transformer (Llama / Qwen2 / SmolLM2 family) with an explicit KV cache.

    model = Transformer(get_variant("tiny"))
    params = model.init(rng, tokens, positions)["params"]
    logits, _ = model.apply({"params": params}, tokens, positions)          # training
    cache = init_cache(cfg, batch, max_len)
    logits, cache = model.apply({"params": params}, tokens, positions,
                                cache=cache)                                 # decoding
    hidden, _ = model.apply({"params": params}, tokens, positions,
                            return_hidden=True)                              # [B, T, D]
    logits = project(cfg, params, hidden[:, :128])          # the head on a few positions
    (hidden, _), sown = model.apply({"params": params}, tokens, return_hidden=True,
                                    mutable=[HIDDEN])
    layer_states = layer_hidden(cfg, sown)                  # [L, B, T, D] block outputs

The cache is a plain pytree passed in and returned (no mutable collection):

    {"k": L x [B, K, S, H], "v": L x [B, K, S, H],
     "segment_ids": [B, S] int32 (0 = empty slot or padding), "index": [] int32}

with ``k`` and ``v`` a tuple of one buffer per layer, or one stacked [L, B, K, S, H]
array when the layers are scanned (``scan_layers``). Separate buffers let XLA update
each layer's cache in place; writing a layer's slice back into a stacked array copies
the whole cache at every decoding step (on CPU, ``experiments/benchmarks/sampler.py``
measured 60 ms per step with separate buffers, 109 ms with ``--scan``'s stacked one).
Heads before slots is the layout single-token attention reads: a [B, S, K, H] cache was
transposed (copied whole) in every layer at every step, a quarter of a decoding step.

Tokens written at cache slot ``s`` attend to slots ``<= s`` of their segment. RoPE uses the
explicit ``positions``, so a left-padded row (positions starting at 0 on its first real
token, padding marked by segment id 0) computes exactly what the unpadded row does.

``qlambda`` (the ternary blend, see ``models/ternary.py``) is a traced scalar or a [L]
vector (one value per layer, for layer-wise warm-up), so schedules never recompile.

``attention`` selects the score computation (``layers.ATTENTION``); ``loss_chunk`` makes
the training steps apply the output head a chunk of positions at a time
(``losses.chunked_target_stats``), so float32 [B, T, V] logits never exist at once.

Every block sows its output (the residual stream after the layer) into the ``HIDDEN``
collection, a no-op unless the caller makes it mutable (distillation's hidden-state
losses, ``training/distill.py``).
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcp_jax.models import layers

Array = jax.Array
HIDDEN = "hidden_states"  # The collection of per-layer block outputs (``layer_hidden``).


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Shape and numerics of a decoder. Frozen and hashable: a Linen attribute."""
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  mlp_activation: str = "swiglu"     # swiglu | geglu | relu2
  rope_base: float = 10_000.0
  rope_style: str = "half"           # half (HF) | interleaved (GPT-J / GGUF)
  rope_scaling: Tuple = ()           # () or ("llama3", factor, low, high, orig_len)
  norm_eps: float = 1e-6
  qkv_bias: bool = False             # Qwen2
  tie_embeddings: bool = True
  dtype: str = "float32"             # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"                # REMAT_POLICIES: none | full | dots | proj | ...
  attention: str = "xla"             # layers.ATTENTION: xla | dot_product | cudnn
  loss_chunk: int = 0                # > 0: training losses project the vocabulary
                                     # this many positions at a time (losses.py)
  embed_init_std: float = 0.02
  # Ternary quantization-aware training (models/ternary.py).
  weight_quant: str = "none"         # registry string, e.g. "absmean"
  act_quant: str = "none"            # registry string, e.g. "absmax_int8"
  quant_layers: Tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  extra_rmsnorm: bool = False        # RMSNorm at the input of every quantized linear
  subln: bool = False                # BitNet SubLN: RMSNorm before o_proj and down_proj

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")
    bad = set(self.quant_layers) - set(layers.DENSE_KINDS)
    if bad:
      raise ValueError(f"quant_layers has unknown kinds {sorted(bad)}; "
                       f"valid: {layers.DENSE_KINDS}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat {self.remat!r}; options: {sorted(REMAT_POLICIES)}.")
    if self.attention not in layers.ATTENTION:
      raise ValueError(f"Unknown attention {self.attention!r}; "
                       f"options: {sorted(layers.ATTENTION)}.")
    if self.loss_chunk < 0:
      raise ValueError(f"loss_chunk must be >= 0 (0 = off), got {self.loss_chunk}.")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def quantizes(self, kind: str) -> bool:
    return self.weight_quant != "none" and kind in self.quant_layers

  def replace(self, **kw) -> "TransformerConfig":
    unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      import difflib  # pylint: disable=g-import-not-at-top
      names = [f.name for f in dataclasses.fields(self)]
      hints = {u: difflib.get_close_matches(u, names, n=3) for u in unknown}
      raise KeyError(f"Unknown model config fields {sorted(unknown)} "
                     f"(nearest: {hints}).")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return dataclasses.replace(self, **kw)


# What each layer keeps for the backward pass (``nn.remat`` policies); the rest is
# recomputed. ``dots`` keeps every matmul output, attention scores [B, K, G, T, S]
# included; ``proj`` keeps the projection outputs (``layers.PROJ_NAMES``) and no
# scores; ``attn_proj`` keeps only q/k/v/o (recomputes the MLP and the scores).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "proj": jax.checkpoint_policies.save_only_these_names(*layers.PROJ_NAMES),
    "attn_proj": jax.checkpoint_policies.save_only_these_names(*layers.PROJ_NAMES[:4]),
}

_LLAMA = dict(mlp_activation="swiglu", rope_style="half")
VARIANTS = {
    # For tests: a few thousand parameters, compiles in seconds.
    "tiny": TransformerConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4,
                              num_kv_heads=2, head_dim=8, mlp_dim=64, **_LLAMA),
    # CPU experiments with the character tokenizer: about 3.2M parameters.
    "small": TransformerConfig(vocab_size=128, num_layers=4, embed_dim=256, num_heads=4,
                               num_kv_heads=2, head_dim=64, mlp_dim=768, **_LLAMA),
    "smollm2-135m": TransformerConfig(
        vocab_size=49152, num_layers=30, embed_dim=576, num_heads=9, num_kv_heads=3,
        head_dim=64, mlp_dim=1536, rope_base=100_000.0, norm_eps=1e-5, **_LLAMA),
    "qwen2.5-0.5b": TransformerConfig(
        vocab_size=151936, num_layers=24, embed_dim=896, num_heads=14, num_kv_heads=2,
        head_dim=64, mlp_dim=4864, rope_base=1_000_000.0, qkv_bias=True, **_LLAMA),
    "llama-3.2-1b": TransformerConfig(
        vocab_size=128256, num_layers=16, embed_dim=2048, num_heads=32, num_kv_heads=8,
        head_dim=64, mlp_dim=8192, rope_base=500_000.0, norm_eps=1e-5,
        rope_scaling=("llama3", 32.0, 1.0, 4.0, 8192), **_LLAMA),
    # Large variants remat "attn_proj": at 2048 tokens per device (FSDP) their train
    # steps plan under 16 GiB per device (docs/accelerators.md §7).
    # ~1B ternary-from-scratch shape (BitNet style: ReLU², SubLN, untied head).
    "1b": TransformerConfig(
        vocab_size=128256, num_layers=24, embed_dim=2048, num_heads=32, num_kv_heads=8,
        head_dim=64, mlp_dim=5632, mlp_activation="relu2", rope_base=500_000.0,
        tie_embeddings=False, subln=True, scan_layers=True, remat="attn_proj",
        dtype="bfloat16"),
    # ~7B (Qwen2.5-7B shape, the FCP paper's base model).
    "7b": TransformerConfig(
        vocab_size=152064, num_layers=28, embed_dim=3584, num_heads=28, num_kv_heads=4,
        head_dim=128, mlp_dim=18944, rope_base=1_000_000.0, qkv_bias=True,
        tie_embeddings=False, scan_layers=True, remat="attn_proj", dtype="bfloat16",
        **_LLAMA),
}


def get_variant(name: str, **overrides) -> TransformerConfig:
  """Returns ``VARIANTS[name]`` with ``overrides`` applied (unknown fields raise)."""
  if name not in VARIANTS:
    raise KeyError(f"Unknown model variant {name!r}; options: {sorted(VARIANTS)}.")
  return VARIANTS[name].replace(**overrides)


def from_config(model_config) -> TransformerConfig:
  """Builds a config from an experiment's ``config.model`` section.

  The section holds ``variant`` plus any ``TransformerConfig`` fields to override, e.g.
  ``ConfigDict(dict(variant="small", weight_quant="absmean", scan_layers=True))``;
  a field set to ``None`` keeps the variant's value (so configs can list overridable
  fields while staying locked).
  """
  fields = {k: v for k, v in dict(model_config).items() if v is not None}  # None: keep
  if "variant" not in fields:
    raise KeyError(f"config.model needs a 'variant' (one of {sorted(VARIANTS)}); "
                   f"it has {sorted(fields)}.")
  return get_variant(fields.pop("variant"), **fields)


def init_cache(cfg: TransformerConfig, batch: int, max_len: int,
               dtype: Optional[Any] = None) -> dict:
  """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)  # [B, K, S, H]
  if cfg.scan_layers:  # One stacked array [L, B, K, S, H], scanned over with the layers.
    kv = lambda: jnp.zeros((cfg.num_layers,) + shape, dtype)
  else:  # One [B, K, S, H] buffer per layer (each updated in place while decoding).
    kv = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return {"k": kv(), "v": kv(),
          "segment_ids": jnp.zeros((batch, max_len), jnp.int32),        # [B, S]
          "index": jnp.zeros((), jnp.int32)}


def _embed(cfg: TransformerConfig) -> nn.Embed:
  return nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=cfg.jnp_dtype,
                  param_dtype=cfg.jnp_param_dtype,
                  embedding_init=nn.with_logical_partitioning(
                      nn.initializers.normal(cfg.embed_init_std), ("vocab", "embed")),
                  name="embed")


def _unembed(cfg: TransformerConfig, embed: nn.Embed, x: Array, qlambda: Array) -> Array:
  """Final hidden states [B, T, D] -> float32 logits [B, T, V] (in a compact method)."""
  if cfg.tie_embeddings:
    # ``embed.attend`` as one 2-D matmul (``layers.flat_dot``).
    logits = layers.flat_dot(x.astype(cfg.jnp_dtype),
                             embed.embedding.astype(cfg.jnp_dtype).T)  # [B, T, V]
  else:
    logits = layers.dense(cfg, "head", cfg.vocab_size, ("embed", "vocab"),
                          name="lm_head")(x, qlambda[-1])  # [B, T, V]
  return nn.with_logical_constraint(logits.astype(jnp.float32),
                                    ("batch", "length", "vocab"))


class _Head(nn.Module):
  """The output head alone, on ``Transformer``'s ``embed`` / ``lm_head`` parameters."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, qlambda: Array) -> Array:
    return _unembed(self.cfg, _embed(self.cfg), x, qlambda)


def project(cfg: TransformerConfig, params: dict, hidden: Array,
            qlambda: Optional[Array] = None) -> Array:
  """The model's output head as a function: ``hidden`` [B, T, D] -> logits [B, T, V].

  ``hidden`` comes from ``Transformer(...)(..., return_hidden=True)``; the chunked loss
  (``losses.chunked_target_stats``) projects it a few positions at a time.
  """
  qlambda = jnp.broadcast_to(
      jnp.asarray(1.0 if qlambda is None else qlambda, jnp.float32), (cfg.num_layers,))
  head_params = {k: params[k] for k in ("embed", "lm_head") if k in params}
  return _Head(cfg).apply({"params": head_params}, hidden, qlambda)


def attention_mask(segment_ids: Array, kv_segment_ids: Array,
                   q_slots: Array, kv_slots: Array) -> Array:
  """[B, T, S] bool: causal by slot, same segment, key not padding."""
  causal = kv_slots[None, None, :] <= q_slots[None, :, None]                 # [1, T, S]
  same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]               # [B, T, S]
  return causal & same & (kv_segment_ids[:, None, :] != 0)


class Block(nn.Module):
  """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, layer_cache: Optional[dict], qlambda: Array,
               rope: Tuple[Array, Array], mask: Array, cache_index: Optional[Array]):
    cfg = self.cfg
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype,
                                       name=name)
    h, layer_cache = layers.Attention(cfg, name="attn")(
        norm("attn_norm")(x), rope, mask, layer_cache, cache_index, qlambda)
    x = nn.with_logical_constraint(x + h, ("batch", "length", "embed"))
    x = x + layers.MLP(cfg, name="mlp")(norm("mlp_norm")(x), qlambda)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    self.sow(HIDDEN, "out", x)  # [B, T, D]; kept only when HIDDEN is mutable.
    return x, layer_cache


class Transformer(nn.Module):
  """The decoder. ``__call__`` returns ``(logits [B, T, V] float32, cache)``.

  With ``return_hidden=True`` it returns ``(hidden [B, T, D], cache)`` instead, the
  final-norm states before the output head, which ``project`` applies.
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, cache: Optional[dict] = None,
               qlambda: Optional[Array] = None, return_hidden: bool = False):
    cfg = self.cfg
    b, t = tokens.shape
    start = cache["index"] if cache is not None else jnp.zeros((), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    qlambda = jnp.broadcast_to(
        jnp.asarray(1.0 if qlambda is None else qlambda, jnp.float32), (cfg.num_layers,))

    q_slots = start + jnp.arange(t, dtype=jnp.int32)                          # [T]
    if cache is None:
      mask = attention_mask(segment_ids, segment_ids, q_slots, q_slots)      # [B, T, T]
      kv_cache = None
    else:
      kv_segments = jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids.astype(jnp.int32), (0, start))   # [B, S]
      kv_slots = jnp.arange(kv_segments.shape[1], dtype=jnp.int32)           # [S]
      mask = attention_mask(segment_ids, kv_segments, q_slots, kv_slots)     # [B, T, S]
      kv_cache = {"k": cache["k"], "v": cache["v"]}

    # RoPE's (sin, cos) [B, T, H/2], computed once for all layers.
    inv_freq = layers.rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    rope = layers.rope_table_once(positions, inv_freq)

    embed = _embed(cfg)
    x = embed(tokens)  # [B, T, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      x, kv_cache = nn.scan(
          block, variable_axes={"params": 0, "intermediates": 0, HIDDEN: 0},
          split_rngs={"params": True}, length=cfg.num_layers,
          in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast),
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")(x, kv_cache, qlambda, rope, mask, start)
    else:
      new_k, new_v = [], []
      for i in range(cfg.num_layers):
        layer_cache = None if kv_cache is None else {"k": kv_cache["k"][i],
                                                     "v": kv_cache["v"][i]}
        x, layer_cache = block(cfg, name=f"layers_{i}")(
            x, layer_cache, qlambda[i], rope, mask, start)
        if layer_cache is not None:
          new_k.append(layer_cache["k"])
          new_v.append(layer_cache["v"])
      if kv_cache is not None:
        kv_cache = {"k": tuple(new_k), "v": tuple(new_v)}

    x = layers.RMSNorm(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype,
                       name="final_norm")(x)  # [B, T, D]
    new_cache = None
    if cache is not None:
      new_cache = {**kv_cache, "segment_ids": kv_segments, "index": start + t}
    if return_hidden:  # The head is left to the caller (``project``).
      return x, new_cache
    return _unembed(cfg, embed, x, qlambda), new_cache


def layer_hidden(cfg: TransformerConfig, sown: dict) -> Array:
  """[L, B, T, D]: every block's output from the ``HIDDEN`` collection of an apply."""
  states = sown[HIDDEN]
  if cfg.scan_layers:
    return states["layers"]["out"][0]  # Stacked by the scan: [L, B, T, D].
  return jnp.stack([states[f"layers_{i}"]["out"][0] for i in range(cfg.num_layers)])


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
