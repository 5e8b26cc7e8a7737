"""Building blocks of the decoder: RMSNorm, RoPE, the Dense factory, attention, MLP.

Einsum letters used across ``fcp_jax.models``:

  B  batch              T  query length          S  key/value (cache) length
  D  embed dim (model)  F  MLP hidden dim        V  vocabulary
  N  query heads        K  key/value heads       G  query heads per K head (N = K*G)
  H  head dim           L  layers

Every projection goes through ``dense(cfg, kind, ...)``: it returns the float ``Dense``
or, when the config quantizes that ``kind`` of layer, ``ternary.TernaryDense``. Both keep
``nn.Dense``'s parameter names (``kernel`` [in, out], ``bias``) and take the ternary blend
``qlambda`` as a call argument (ignored by the float layer). Their outputs carry
``checkpoint_name`` tags (``PROJ_NAMES``) that the remat policies save by name.
"""

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
# Projection kinds a config can select for quantization.
DENSE_KINDS = ("q", "k", "v", "o", "gate", "up", "down", "head")
NEG_INF = -1e30  # Finite, so fully masked rows (padding queries) give no NaN.
# ``checkpoint_name`` tags of the projection outputs (remat policies save them by name).
PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tag(x: Array, name: str) -> Array:
  """Names a projection output for ``save_only_these_names`` (an identity)."""
  return checkpoint_name(x, name)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned gain ``scale`` [D]; computes in float32."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, base: float, scaling: Tuple = ()) -> Array:
  """Inverse frequencies [H/2]; ``scaling=("llama3", factor, low, high, orig_len)``."""
  inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling:
    kind, factor, low, high, orig = scaling
    if kind != "llama3":
      raise ValueError(f"Unknown rope_scaling {kind!r}; supported: 'llama3'.")
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    inv = jnp.where((wavelen <= low_wl) & (wavelen >= high_wl), mid, scaled)
  return inv


def rope_table(positions: Array, inv_freq: Array) -> Tuple[Array, Array]:
  """The rotation of ``positions`` [B, T]: ``(sin, cos)``, float32 [B, T, H/2] each."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  return jnp.sin(angles), jnp.cos(angles)


def rope_table_once(positions: Array, inv_freq: Array) -> Tuple[Array, Array]:
  """``rope_table``, computed once into a buffer on XLA:CPU (the same values).

  XLA:CPU fuses an elementwise producer into each of its consumer fusions: every query
  and key rotation of every layer, forward and backward, evaluated sin and cos again for
  each head and each half of every head (16 times [B, T, N, H] for 4 layers, a few
  percent of a small model's train step). A ``cond`` whose two branches are the same
  computation is a value XLA cannot fuse or fold away (``optimization_barrier`` is
  stripped before fusion), so the tables are computed once and read by every layer;
  its predicate, whatever it is, selects the same result. On other backends the
  recomputation is cheap and a conditional is not (a GPU reads its predicate back), and
  a decoding step (one position per row) has tables of a few KB: plain ``rope_table``.
  """
  if jax.default_backend() != "cpu" or positions.shape[-1] <= 1 or positions.size == 0:
    return rope_table(positions, inv_freq)
  pred = positions.reshape(-1)[0] == 0  # Traced, so XLA keeps the conditional.
  return jax.lax.cond(pred, rope_table, rope_table, positions, inv_freq)


def rotate(x: Array, table: Tuple[Array, Array], style: str) -> Array:
  """Rotates ``x`` [B, T, N, H] by ``table = (sin, cos)`` [B, T, H/2] (``rope_table``).

  ``style="half"`` rotates the two halves of each head (Hugging Face Llama/Qwen2);
  ``style="interleaved"`` rotates adjacent pairs (GPT-J, llama.cpp's GGUF layout).
  """
  sin, cos = table[0][:, :, None, :], table[1][:, :, None, :]  # [B, T, 1, H/2]
  x32 = x.astype(jnp.float32)
  if style == "half":
    x1, x2 = jnp.split(x32, 2, axis=-1)  # [B, T, N, H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  elif style == "interleaved":
    x1, x2 = x32[..., 0::2], x32[..., 1::2]  # [B, T, N, H/2] each
    out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = out.reshape(x.shape)
  else:
    raise ValueError(f"Unknown rope_style {style!r}; use 'half' or 'interleaved'.")
  return out.astype(x.dtype)


def apply_rope(x: Array, positions: Array, inv_freq: Array, style: str) -> Array:
  """Rotates ``x`` [B, T, N, H] by ``positions`` [B, T] (``rotate`` of ``rope_table``)."""
  return rotate(x, rope_table(positions, inv_freq), style)


def flat_dot(x: Array, kernel: Array, precision: Any = None,
             preferred_element_type: Any = None) -> Array:
  """``x`` [..., in] @ ``kernel`` [in, out] -> [..., out] as one 2-D matmul.

  The same products as ``jnp.dot(x, kernel)``; the backward pass may sum the weight
  gradient in another float32 order (1 ulp, so long trainings end elsewhere within seed
  noise; ``docs/findings.md`` §9). Folding the leading axes into
  one before the matmul makes the backward pass's kernel gradient a plain 2-D
  ``x2.T @ g2`` ([in, N] x [N, out]); from the 3-D dot, XLA:CPU contracts two axes
  and lays the gradient out transposed first, a copy of the [N, out] activation
  gradient (and of the elementwise fusion that produces it) per projection.
  """
  x2 = x.reshape(-1, x.shape[-1])  # [N, in]
  y = jnp.dot(x2, kernel, precision=precision,
              preferred_element_type=preferred_element_type)  # [N, out]
  return y.reshape(x.shape[:-1] + y.shape[-1:])  # [..., out]


class Dense(nn.Module):
  """Float linear layer ``y = x @ kernel (+ bias)`` with logical axis names."""
  features: int
  kernel_axes: Tuple[str, str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, qlambda: Optional[Array] = None) -> Array:
    del qlambda  # Float layer: nothing to blend.
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            self.kernel_axes), (x.shape[-1], self.features), self.param_dtype)
    y = flat_dot(x.astype(self.dtype), kernel.astype(self.dtype),
                 precision=self.precision)  # [..., out]
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[1:]), (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(cfg, kind: str, features: int, axes: Tuple[str, str], *,
          use_bias: bool = False, name: Optional[str] = None) -> nn.Module:
  """The one factory for every projection of the model.

  Returns ``ternary.TernaryDense`` when ``cfg.weight_quant`` is not ``"none"`` and
  ``kind`` is in ``cfg.quant_layers``; otherwise the float ``Dense``.
  """
  if kind not in DENSE_KINDS:
    raise ValueError(f"Unknown dense kind {kind!r}; expected one of {DENSE_KINDS}.")
  common = dict(features=features, kernel_axes=axes, use_bias=use_bias,
                dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name=name)
  if cfg.quantizes(kind):
    from fcp_jax.models import ternary  # pylint: disable=g-import-not-at-top
    return ternary.TernaryDense(**common, **ternary.layer_options(cfg, kind))
  return Dense(**common)


def _attention_logits(q: Array, k: Array) -> Array:
  """q [B, T, K, G, H] . k [B, S, K, H] -> float32 [B, K, G, T, S].

  A single-token query (decoding) is a broadcast multiply and a sum over H, which XLA
  fuses into one loop (reading the cache slice in place); a ``dot_general`` batched
  over B*K rows of [G, H] x [H, S] runs B*K tiny matmuls instead (slower on CPU).
  Longer queries (training, prefill) use the matmul.
  """
  if q.shape[1] == 1:
    prod = q[:, 0, :, :, None, :].astype(jnp.float32) * k.transpose(0, 2, 1, 3)[
        :, :, None, :, :].astype(jnp.float32)  # [B, K, G, S, H]
    return jnp.sum(prod, axis=-1)[:, :, :, None, :]  # [B, K, G, 1, S]
  return jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)


def _attention_values(probs: Array, v: Array) -> Array:
  """probs [B, K, G, T, S] . v [B, S, K, H] -> [B, T, K, G, H] (fused when T = 1)."""
  if probs.shape[3] == 1:
    prod = probs[:, :, :, 0, :, None] * v.transpose(0, 2, 1, 3)[:, :, None]  # [B,K,G,S,H]
    return jnp.sum(prod, axis=3)[:, None]  # [B, 1, K, G, H]
  return jnp.einsum("bkgts,bskh->btkgh", probs, v)


def xla_attention(q: Array, k: Array, v: Array, mask: Array, dtype: Any) -> Array:
  """The reference: einsums over float32 scores [B, K, G, T, S], masked, softmaxed.

  q [B, T, N, H], k and v [B, S, K, H], mask [B, T, S] bool -> [B, T, N, H] ``dtype``.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
  logits = _attention_logits(q, k.astype(q.dtype)) / math.sqrt(h)  # [B, K, G, T, S]
  logits = jnp.where(mask[:, None, None], logits, NEG_INF)  # [B, K, G, T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = _attention_values(probs, v.astype(probs.dtype))  # [B, T, K, G, H]
  return out.reshape(b, t, n, h)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, dtype: Any,
                          implementation: Optional[str] = None) -> Array:
  """``jax.nn.dot_product_attention`` (grouped heads natively); shapes as ``xla_attention``.

  ``implementation=None`` lets JAX choose (its XLA path as of JAX 0.10);
  ``"cudnn"`` is cuDNN's fused flash attention, which keeps no [T, S] scores.
  """
  out = jax.nn.dot_product_attention(
      q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None],
      implementation=implementation)  # [B, T, N, H]
  return out.astype(dtype)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Array, dtype: Any) -> Array:
  """cuDNN flash attention: needs a GPU and bfloat16 or float16 compute."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise ValueError(f"attention='cudnn' needs a GPU; JAX's backend here is {backend!r} "
                     "(use attention='dot_product' or 'xla').")
  if jnp.dtype(q.dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, not {q.dtype}.")
  return dot_product_attention(q, k, v, mask, dtype, implementation="cudnn")


# ``TransformerConfig.attention`` -> fn(q, k, v, mask, dtype) -> [B, T, N, H].
ATTENTION = {"xla": xla_attention, "dot_product": dot_product_attention,
             "cudnn": cudnn_attention}


class Attention(nn.Module):
  """Grouped-query attention with RoPE and an explicit per-layer KV cache.

  The score computation is ``ATTENTION[cfg.attention]``.
  """
  cfg: Any

  @nn.compact
  def __call__(self, x: Array, rope: Tuple[Array, Array], mask: Array,
               layer_cache: Optional[dict], cache_index: Optional[Array],
               qlambda: Array) -> Tuple[Array, Optional[dict]]:
    """``rope``: the ``rope_table`` of the positions (shared by all layers)."""
    cfg = self.cfg
    b, t, _ = x.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = dense(cfg, "q", n * h, ("embed", "heads"), use_bias=cfg.qkv_bias,
              name="q_proj")(x, qlambda)
    q = _tag(q, "q_proj").reshape(b, t, n, h)  # [B, T, N, H]
    kk = dense(cfg, "k", k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias,
               name="k_proj")(x, qlambda)
    kk = _tag(kk, "k_proj").reshape(b, t, k, h)  # [B, T, K, H]
    v = dense(cfg, "v", k * h, ("embed", "kv_heads"), use_bias=cfg.qkv_bias,
              name="v_proj")(x, qlambda)
    v = _tag(v, "v_proj").reshape(b, t, k, h)  # [B, T, K, H]
    q = rotate(q, rope, cfg.rope_style)
    kk = rotate(kk, rope, cfg.rope_style)

    if layer_cache is not None:  # Write this chunk at cache_index, attend to all S.
      # The cache is [B, K, S, H]: a single-token query reads it in place (the
      # transposes below cancel in ``_attention_logits``/``_attention_values``), where a
      # [B, S, K, H] cache would be copied to that layout at every decoding step.
      zero = jnp.zeros((), jnp.int32)
      start = (zero, zero, cache_index, zero)
      write = lambda buf, x: jax.lax.dynamic_update_slice(
          buf, x.astype(buf.dtype).transpose(0, 2, 1, 3), start)  # [B, K, S, H]
      layer_cache = {"k": write(layer_cache["k"], kk), "v": write(layer_cache["v"], v)}
      kk = layer_cache["k"].transpose(0, 2, 1, 3)  # [B, S, K, H]
      v = layer_cache["v"].transpose(0, 2, 1, 3)  # [B, S, K, H]

    out = ATTENTION[cfg.attention](q, kk, v, mask, cfg.jnp_dtype)  # [B, T, N, H]
    out = out.reshape(b, t, n * h)  # [B, T, N*H]
    out = dense(cfg, "o", cfg.embed_dim, ("heads", "embed"), name="o_proj")(out, qlambda)
    return _tag(out, "o_proj"), layer_cache


def _relu2(x):
  return jnp.square(jax.nn.relu(x))


MLP_ACTIVATIONS = {"swiglu": jax.nn.silu, "geglu": jax.nn.gelu, "relu2": _relu2}


class MLP(nn.Module):
  """Gated MLP: ``down(act(gate(x)) * up(x))``; ``relu2`` is BitNet's squared ReLU."""
  cfg: Any

  @nn.compact
  def __call__(self, x: Array, qlambda: Array) -> Array:
    cfg = self.cfg
    if cfg.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"Unknown mlp_activation {cfg.mlp_activation!r}; "
                       f"options: {sorted(MLP_ACTIVATIONS)}.")
    act = MLP_ACTIVATIONS[cfg.mlp_activation]
    gate = _tag(dense(cfg, "gate", cfg.mlp_dim, ("embed", "mlp"), name="gate_proj")(
        x, qlambda), "gate_proj")  # [B, T, F]
    up = _tag(dense(cfg, "up", cfg.mlp_dim, ("embed", "mlp"), name="up_proj")(
        x, qlambda), "up_proj")  # [B, T, F]
    hidden = nn.with_logical_constraint(act(gate) * up, ("batch", "length", "mlp"))
    return _tag(dense(cfg, "down", cfg.embed_dim, ("mlp", "embed"),
                      name="down_proj")(hidden, qlambda), "down_proj")  # [B, T, D]
