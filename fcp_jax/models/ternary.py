"""Quantization-aware ternary (1.58-bit) linear layers: quantizers, TernaryDense, the STE.

A ``TernaryDense`` keeps ``nn.Dense``'s parameters (``kernel`` [K, N], ``bias`` [N]) as the
float latent weights and quantizes them on the fly; the method is chosen by registry
strings (``docs/ternary_methods.md`` §2 has the equations)::

    weight_quant = "absmean"                                   # BitNet b1.58
    weight_quant = "absmean(granularity='channel', stat='median')"
    weight_quant = "twn" | "tbt" | "seq(grad='paretoq')" | "dlt" | "tequila(group_size=64)"
    act_quant    = "none" | "absmax_int8" | "elastic(bits=4)"

Forward pass, with the blend ``λ = qlambda`` a traced f32 scalar (no recompiles):

    x ← g ⊙ rmsnorm(x)                                 if input_norm (extra RMSNorm / SubLN)
    x̂ = (1-λ) x + λ Q_a(x)                             straight-through (identity) gradient
    Ŵ = (1-λ) W + λ s·T (+ shift)                      per method, see each quantizer
    y = x̂ Ŵ (+ bias) (+ λ b_deadzone)                  Tequila's dead-zone bias

Every quantized value is computed *exactly* (``sg(v) + (u - sg(u))`` carries a gradient
without touching the forward value), so λ=0 is bitwise the float layer and λ=1 is
bitwise ``dequantize(quantize(W))``, the same function the packed export uses
(``models/packing.py``). When the layer's params hold ``codes`` instead of ``kernel``
(a tree written by ``packing.pack_params``) the layer runs the packed integer path:
int8 activations × ternary codes accumulated in int32, then rescaled (float activations:
codes converted inside the dot, the scale on its output). ``codes_u32`` (the prepared
form of ``packing.prepare_for_inference``) runs ``ternary_kernel.matmul`` instead, which
decodes the 2-bit codes inside the matmul (a compiled kernel on CPU).

Granularity of the scale statistics: the kernel [K, N] is viewed as blocks
``[a, K/a, b, N/b]`` and statistics have the compact shape [a, b]:
tensor (1, 1), channel (1, N), group (K/G, N), shard (S, 1) or (1, S) along the
tensor-parallel axis (TriLM's per-shard scales).

The training-side helpers (λ schedule, weight-decay mask, checkpoint parameter
conversions, quantization metrics) live in ``fcp_jax.models.ternary_training``.
"""

import dataclasses
import functools
import math
from typing import Any, ClassVar, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcp_jax import registry
from fcp_jax.models import layers
from fcp_jax.models import ternary_kernel

Array = jax.Array
sg = jax.lax.stop_gradient

WEIGHT_QUANTIZERS = registry.Registry("weight quantizer")
ACT_QUANTIZERS = registry.Registry("activation quantizer")

GRANULARITIES = ("tensor", "channel", "group", "shard")
# Logical axis names that tensor parallelism splits (where TriLM's shards live).
TENSOR_PARALLEL_AXES = ("heads", "kv_heads", "mlp", "vocab")
# Parameters a ternary layer adds to a float Dense (never weight-decayed).
QUANT_PARAM_NAMES = ("w_alpha", "w_shift", "a_alpha", "norm_scale")
# Projection kinds that get BitNet's SubLN (a norm at the input of o_proj / down_proj).
SUBLN_KINDS = ("o", "down")
# Names of the monitoring values a TernaryDense sows into "intermediates".
SOW_NAMES = ("zero_frac", "code_hist", "scale")
# Packed inference forms: the parameter that marks one -> the TernaryDense method that
# runs it (``packing.pack_params`` writes ``codes``, ``prepare_for_inference`` the other).
PACKED_FORMS = {"codes_u32": "_prepared", "codes": "_packed"}


# ---------------------------------------------------------------------------------------
# Gradient tricks that keep forward values exact.
# ---------------------------------------------------------------------------------------


def ste(value: Array, carrier: Array) -> Array:
  """Forward: exactly ``value``. Backward: the gradient of ``carrier``."""
  return sg(value) + (carrier - sg(carrier))


def round_ste(u: Array) -> Array:
  """``r(u)``: round half to even, straight-through gradient."""
  return ste(jnp.round(u), u)


def grad_scale(a: Array, g: float) -> Array:
  """``gs(a, g)``: forward exactly ``a``, gradient multiplied by ``g`` (LSQ)."""
  return ste(a, a * g)


def blend(x: Array, q: Array, lam: Array) -> Array:
  """``(1-λ) x + λ q``: exactly ``x`` at λ=0 and exactly ``q`` at λ=1."""
  return (1.0 - lam) * x + lam * q


# ---------------------------------------------------------------------------------------
# Block statistics (tensor / channel / group / shard granularity).
# ---------------------------------------------------------------------------------------


def to_blocks(x: Array, blocks: Tuple[int, int]) -> Array:
  """[K, N] -> [a, K/a, b, N/b]."""
  a, b = blocks
  k, n = x.shape
  return x.reshape(a, k // a, b, n // b)


def block_stat(x: Array, blocks: Tuple[int, int], stat: str) -> Array:
  """Reduces ``x`` [K, N] within each block; returns the compact [a, b] statistic."""
  xb = to_blocks(x, blocks)  # [a, K/a, b, N/b]
  if stat == "median":
    a, b = blocks
    return jnp.median(xb.transpose(0, 2, 1, 3).reshape(a, b, -1), axis=-1)
  reducers = {"mean": jnp.mean, "max": jnp.max, "sum": jnp.sum}
  return reducers[stat](xb, axis=(1, 3))


def expand(s: Array, shape: Tuple[int, int]) -> Array:
  """Compact [a, b] statistic -> [K, N] (every weight gets its block's value)."""
  a, b = s.shape
  k, n = shape
  return jnp.broadcast_to(s[:, None, :, None], (a, k // a, b, n // b)).reshape(k, n)


class Quantized(NamedTuple):
  """A ternary kernel: ``W_deq = expand(scale) * codes (+ expand(shift))``."""
  codes: Array                    # [K, N] float values in {-1, 0, 1}
  scale: Array                    # [a, b] f32 multiplier
  shift: Optional[Array] = None   # [a, b] (dlt)
  bias: Optional[Array] = None    # [N] input-independent output bias (tequila)


def dequantize(q: Quantized) -> Array:
  """The dequantized weight [K, N]; shared by the training forward and the export."""
  w = expand(q.scale, q.codes.shape) * q.codes.astype(jnp.float32)
  if q.shift is not None:
    w = w + expand(q.shift, q.codes.shape)
  return w


# ---------------------------------------------------------------------------------------
# Weight quantizers.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
  """Base: granularity handling and the parameter-free STE blend.

  Subclasses implement ``quantize(w, qparams) -> Quantized``; learnable ones also
  ``param_shapes`` / ``init_params`` and override ``fake_quant``.
  """
  granularity: str = "tensor"
  group_size: int = 128
  shards: int = 1
  shard_axis: int = 1  # Set by TernaryDense from the kernel's logical axes.
  eps: float = 1e-5

  method: ClassVar[str] = ""

  def __post_init__(self):
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"{self.method}: unknown granularity {self.granularity!r}; "
                       f"options: {GRANULARITIES}.")
    if self.group_size < 1 or self.shards < 1 or self.shard_axis not in (0, 1):
      raise ValueError(f"{self.method}: need group_size >= 1, shards >= 1 and shard_axis "
                       f"in (0, 1); got {self.group_size}, {self.shards}, "
                       f"{self.shard_axis}.")

  def blocks(self, shape: Tuple[int, int]) -> Tuple[int, int]:
    """The compact statistic shape [a, b] for a kernel of ``shape`` [K, N]."""
    k, n = shape
    if self.granularity == "tensor":
      return 1, 1
    if self.granularity == "channel":
      return 1, n
    if self.granularity == "group":
      g = min(self.group_size, k)
      if k % g:
        valid = [d for d in range(1, k + 1) if k % d == 0]
        raise ValueError(f"{self.method}(group_size={g}): the input dim K={k} is not a "
                         f"multiple of the group size; valid group_size values (the "
                         f"divisors of K) are {valid}, or granularity='channel'.")
      return k // g, n
    dim = shape[self.shard_axis]
    if dim % self.shards:
      raise ValueError(f"{self.method}: kernel axis {self.shard_axis} of size {dim} "
                       f"does not split into shards={self.shards}.")
    return (self.shards, 1) if self.shard_axis == 0 else (1, self.shards)

  def param_shapes(self, shape: Tuple[int, int]) -> Dict[str, Tuple[int, ...]]:
    del shape
    return {}

  def init_params(self, w: Array) -> Dict[str, Array]:
    del w
    return {}

  def quantize(self, w: Array, qparams: Dict[str, Array]) -> Quantized:
    raise NotImplementedError

  def fake_quant(self, w: Array, qparams: Dict[str, Array],
                 lam: Array) -> Tuple[Array, Optional[Array]]:
    """Returns (Ŵ [K, N], output bias [N] or None). Identity STE on W."""
    q = self.quantize(sg(w), qparams)
    w_hat = ste(blend(w, dequantize(q), lam), w)
    return w_hat, None if q.bias is None else lam * q.bias

  def _absmean(self, w: Array) -> Array:
    return block_stat(jnp.abs(w), self.blocks(w.shape), "mean")  # [a, b]


@WEIGHT_QUANTIZERS.register("none")
@dataclasses.dataclass(frozen=True)
class NoWeightQuant(WeightQuantizer):
  """Float weights (for activation-only quantization); exports the float kernel."""
  method: ClassVar[str] = "none"

  def fake_quant(self, w, qparams, lam):
    del qparams, lam
    return w, None


@WEIGHT_QUANTIZERS.register("absmean")
@dataclasses.dataclass(frozen=True)
class AbsMean(WeightQuantizer):
  """BitNet b1.58: γ = max(mean|W|, ε) (or the median); T = clip(round(W/γ), -1, 1)."""
  stat: str = "mean"
  method: ClassVar[str] = "absmean"

  def __post_init__(self):
    super().__post_init__()
    if self.stat not in ("mean", "median"):
      raise ValueError(f"absmean: stat must be 'mean' or 'median', got {self.stat!r}.")

  def quantize(self, w, qparams):
    gamma = jnp.maximum(block_stat(jnp.abs(w), self.blocks(w.shape), self.stat),
                        self.eps)  # [a, b]
    codes = jnp.clip(jnp.round(w / expand(gamma, w.shape)), -1, 1)  # [K, N]
    return Quantized(codes, gamma)


@WEIGHT_QUANTIZERS.register("twn")
@dataclasses.dataclass(frozen=True)
class TWN(WeightQuantizer):
  """Ternary weight networks: Δ = δ mean|W|; T = sign(W) 1[|W| > Δ].

  ``scale="twn"``: s = mean |W| over the non-zero codes. ``scale="tbt"``: s = 4/3 mean|W|
  and T = clip(round(W/s)) (threshold s/2), as in Binary/Ternary Transformer.
  """
  granularity: str = "channel"
  delta: float = 0.7
  scale: str = "twn"
  method: ClassVar[str] = "twn"

  def __post_init__(self):
    super().__post_init__()
    if self.scale not in ("twn", "tbt"):
      raise ValueError(f"{self.method}: scale must be 'twn' or 'tbt', got {self.scale!r}.")

  def quantize(self, w, qparams):
    blocks = self.blocks(w.shape)
    mean_abs = block_stat(jnp.abs(w), blocks, "mean")  # [a, b]
    if self.scale == "tbt":
      s = jnp.maximum(mean_abs * (4.0 / 3.0), self.eps)
      codes = jnp.clip(jnp.round(w / expand(s, w.shape)), -1, 1)  # [K, N]
      return Quantized(codes, s)
    codes, s = _twn_codes_and_scale(w, blocks, self.delta, self.eps)
    return Quantized(codes, s)


@WEIGHT_QUANTIZERS.register("tbt")
@dataclasses.dataclass(frozen=True)
class TBT(TWN):
  """``twn(scale='tbt')`` under its own name."""
  scale: str = "tbt"
  method: ClassVar[str] = "tbt"


def _twn_codes_and_scale(w: Array, blocks: Tuple[int, int], delta: float,
                         eps: float) -> Tuple[Array, Array]:
  abs_w = jnp.abs(w)
  thresh = delta * block_stat(abs_w, blocks, "mean")  # [a, b]
  nonzero = abs_w > expand(thresh, w.shape)  # [K, N]
  codes = jnp.where(nonzero, jnp.sign(w), 0.0)
  count = block_stat(nonzero.astype(jnp.float32), blocks, "sum")
  total = block_stat(jnp.where(nonzero, abs_w, 0.0), blocks, "sum")
  return codes, jnp.maximum(total / jnp.maximum(count, 1.0), eps)


@WEIGHT_QUANTIZERS.register("seq")
@dataclasses.dataclass(frozen=True)
class SEQ(WeightQuantizer):
  """ParetoQ stretched elastic quant: learnable α (init max|W|), levels {-⅔, 0, ⅔}·α.

  u = clip(W/α, ±c); T = round(1.5 u); Ŵ = ⅔ α T. α's gradient is scaled by
  1/sqrt(K N). ``grad="paretoq"`` (default) is ParetoQ's own backward (±1 outside the
  clip) through ``custom_vjp``; ``grad="autodiff"`` gives the LSQ gradients (±⅔).
  """
  granularity: str = "channel"
  clip: float = 0.99
  grad: str = "paretoq"
  method: ClassVar[str] = "seq"

  def __post_init__(self):
    super().__post_init__()
    if self.grad not in ("autodiff", "paretoq"):
      raise ValueError(f"seq: grad must be 'autodiff' or 'paretoq', got {self.grad!r}.")
    if not 0.0 < self.clip < 1.0:
      raise ValueError(f"seq: clip must lie in (0, 1), got {self.clip}.")

  def param_shapes(self, shape):
    return {"w_alpha": self.blocks(shape)}

  def init_params(self, w):
    return {"w_alpha": jnp.maximum(block_stat(jnp.abs(w), self.blocks(w.shape), "max"),
                                   self.eps)}

  def _alpha(self, qparams):
    return jnp.maximum(qparams["w_alpha"].astype(jnp.float32), self.eps)  # [a, b]

  def quantize(self, w, qparams):
    alpha = self._alpha(qparams)
    u = jnp.clip(w / expand(alpha, w.shape), -self.clip, self.clip)
    return Quantized(jnp.round(1.5 * u), alpha * (2.0 / 3.0))

  def fake_quant(self, w, qparams, lam):
    g = 1.0 / math.sqrt(w.size)
    alpha = expand(self._alpha(qparams), w.shape)  # [K, N]
    if self.grad == "paretoq":
      w_q = _seq_paretoq(w, alpha, self.clip, g)
    else:
      alpha = grad_scale(alpha, g)
      codes = round_ste(1.5 * jnp.clip(w / alpha, -self.clip, self.clip))
      w_q = (alpha * (2.0 / 3.0)) * codes
    return blend(w, w_q, lam), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _seq_paretoq(w: Array, alpha: Array, clip: float, g: float) -> Array:
  codes = jnp.round(1.5 * jnp.clip(w / alpha, -clip, clip))
  return (alpha * (2.0 / 3.0)) * codes


def _seq_paretoq_fwd(w, alpha, clip, g):
  return _seq_paretoq(w, alpha, clip, g), (w, alpha)


def _seq_paretoq_bwd(clip, g, res, ct):
  w, alpha = res
  u = w / alpha
  below, above = u < -clip, u > clip
  inside = ~(below | above)
  codes = jnp.round(1.5 * jnp.clip(u, -clip, clip))
  d_alpha = jnp.where(below, -1.0, jnp.where(above, 1.0, codes / 1.5 - u))
  return jnp.where(inside, ct, 0.0), d_alpha * ct * g


_seq_paretoq.defvjp(_seq_paretoq_fwd, _seq_paretoq_bwd)


@WEIGHT_QUANTIZERS.register("dlt")
@dataclasses.dataclass(frozen=True)
class DLT(WeightQuantizer):
  """TernaryLLM dual learnable ternarization: Ŵ = α T + γ with learnable α, γ.

  T = sign(W) 1[|W| > δ mean|W|] (no gradient); α starts at TWN's scale, γ at 0.
  Gradients: ∂Ŵ/∂α = T, ∂Ŵ/∂γ = 1, identity for W. Groupwise (G = 128 along K) by
  default, as in the paper.
  """
  granularity: str = "group"
  delta: float = 0.7
  method: ClassVar[str] = "dlt"

  def param_shapes(self, shape):
    blocks = self.blocks(shape)
    return {"w_alpha": blocks, "w_shift": blocks}

  def init_params(self, w):
    _, s = _twn_codes_and_scale(w, self.blocks(w.shape), self.delta, self.eps)
    return {"w_alpha": s, "w_shift": jnp.zeros_like(s)}

  def quantize(self, w, qparams):
    blocks = self.blocks(w.shape)
    thresh = self.delta * block_stat(jnp.abs(w), blocks, "mean")  # [a, b]
    codes = jnp.where(jnp.abs(w) > expand(thresh, w.shape), jnp.sign(w), 0.0)
    return Quantized(codes, qparams["w_alpha"].astype(jnp.float32),
                     qparams["w_shift"].astype(jnp.float32))

  def fake_quant(self, w, qparams, lam):
    q = self.quantize(sg(w), qparams)  # Codes carry no gradient; α, γ do.
    w_q = dequantize(q) + (w - sg(w))
    return blend(w, w_q, lam), None


@WEIGHT_QUANTIZERS.register("tequila")
@dataclasses.dataclass(frozen=True)
class Tequila(WeightQuantizer):
  """Tequila: absmean ternary per group, dead-zone weights reused as an output bias.

  α = mean|W| per group, T = sign(W) 1[|W| ≥ α/2], D = 1[|W| < α/2];
  b = bias_lambda Σ_i (W ⊙ D)[i, :]. The gradient of W is the identity plus
  bias_lambda · D ⊙ Σ_tokens ∂L/∂y (from autodiff through b).
  """
  granularity: str = "group"
  bias_lambda: float = 1e-3
  method: ClassVar[str] = "tequila"

  def _parts(self, w):
    alpha = jnp.maximum(self._absmean(sg(w)), self.eps)  # [a, b]
    keep = jnp.abs(sg(w)) >= expand(alpha, w.shape) * 0.5  # [K, N]
    bias = self.bias_lambda * jnp.sum(jnp.where(keep, 0.0, w), axis=0)  # [N]
    return jnp.where(keep, jnp.sign(sg(w)), 0.0), alpha, bias

  def quantize(self, w, qparams):
    codes, alpha, bias = self._parts(w)
    return Quantized(codes, alpha, bias=bias)

  def fake_quant(self, w, qparams, lam):
    codes, alpha, bias = self._parts(w)  # bias keeps its gradient to W.
    w_hat = ste(blend(w, dequantize(Quantized(codes, alpha)), lam), w)
    return w_hat, lam * bias


# ---------------------------------------------------------------------------------------
# Activation quantizers.
# ---------------------------------------------------------------------------------------


class IntActs(NamedTuple):
  """Integer activations for the packed path: ``x̂ = q / div (+ offset)``."""
  q: Array    # [..., K] int8
  div: Array  # [..., 1] or [] f32
  offset: Optional[Array] = None  # [] f32: TBT's unsigned min-shift

  def value(self) -> Array:
    """The dequantized activations x̂ [..., K] f32."""
    x = self.q.astype(jnp.float32) / self.div
    return x if self.offset is None else x + self.offset


@dataclasses.dataclass(frozen=True)
class ActQuantizer:
  """Base: float activations; subclasses quantize."""
  method: ClassVar[str] = ""

  def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {}

  def init_params(self, x: Array) -> Dict[str, Array]:
    del x
    return {}

  def fake_quant(self, x: Array, qparams: Dict[str, Array], lam: Array) -> Array:
    del qparams, lam
    return x

  def int_quantize(self, x: Array, qparams: Dict[str, Array]) -> Optional[IntActs]:
    """int8 codes for the packed path, or None for float activations."""
    del x, qparams
    return None


@ACT_QUANTIZERS.register("none")
@dataclasses.dataclass(frozen=True)
class NoActQuant(ActQuantizer):
  """Float activations (A16: TriLM, ParetoQ, Tequila, TernaryLLM)."""
  method: ClassVar[str] = "none"


@ACT_QUANTIZERS.register("absmax_int8")
@dataclasses.dataclass(frozen=True)
class AbsMaxInt8(ActQuantizer):
  """BitNet per-token absmax: s = Qp / max(max_k |x_k|, ε); x̂ = clip(round(x s)) / s."""
  bits: int = 8
  eps: float = 1e-5
  method: ClassVar[str] = "absmax_int8"

  def __post_init__(self):
    if not 2 <= self.bits <= 8:
      raise ValueError(f"absmax_int8: bits must be in [2, 8] (int8 serving), "
                       f"got {self.bits}.")

  def _codes(self, x):
    qp = 2 ** (self.bits - 1) - 1
    s = qp / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), self.eps)  # [..., 1]
    return jnp.clip(jnp.round(x * s), -qp - 1, qp), s

  def fake_quant(self, x, qparams, lam):
    codes, s = self._codes(sg(x))
    return ste(blend(x, codes / s, lam), x)

  def int_quantize(self, x, qparams):
    codes, s = self._codes(x)
    return IntActs(codes.astype(jnp.int8), s)


@ACT_QUANTIZERS.register("elastic")
@dataclasses.dataclass(frozen=True)
class Elastic(ActQuantizer):
  """TBT's elastic (LSQ) activations, learnable per-layer step α (``a_alpha``).

  Signed:   x̂ = α clip(round(x/α), Qn, Qp), [Qn, Qp] = [-1, 1] at 2 bits,
            [-2^(b-1), 2^(b-1)-1] above; 1 bit is x̂ = α sign(x).
  Unsigned: x̂ = α clip(round((x-m)/α), 0, Qp) + m with the dynamic min-shift
            m = sg(min x) over the tensor; Qp = 2 at 2 bits, else 2^b - 1 (1 bit: m = 0).
  ∂x̂/∂x = 1[Qn ≤ (x-m)/α ≤ Qp]; α gets the LSQ gradient (1 bit: Σ sign(x)) scaled by
  1/sqrt(numel(x) Qp). α is initialised from the layer's input x as TBT's
  ``AlphaInit``: 2 mean|x| / sqrt(max(2^(b-1)-1, 1)) signed, 4 mean|x| / sqrt(2^b-1)
  unsigned. ``ternary_training.init_act_alphas`` redoes it from a real batch.
  """
  bits: int = 8
  signed: bool = True
  eps: float = 1e-5
  method: ClassVar[str] = "elastic"

  def __post_init__(self):
    if not 1 <= self.bits <= (8 if self.signed else 7):
      raise ValueError(f"elastic: bits={self.bits} signed={self.signed} does not fit "
                       "int8 serving (signed <= 8 bits, unsigned <= 7).")

  @property
  def levels(self) -> Tuple[int, int]:
    """(Qn, Qp) of the codes."""
    if not self.signed:
      return 0, 2 if self.bits == 2 else 2 ** self.bits - 1
    if self.bits <= 2:
      return -1, 1
    return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

  @property
  def binary(self) -> bool:
    return self.signed and self.bits == 1

  def param_shapes(self):
    return {"a_alpha": ()}

  def init_params(self, x):
    c, qp = (2.0, max(2 ** (self.bits - 1) - 1, 1)) if self.signed else (
        4.0, 2 ** self.bits - 1)
    alpha = c * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(qp)
    return {"a_alpha": jnp.maximum(alpha, self.eps)}

  def _alpha(self, qparams):
    return jnp.maximum(qparams["a_alpha"].astype(jnp.float32), self.eps)

  def _shift(self, x):
    """TBT's min-shift m (unsigned, > 1 bit), constant to the gradient; else 0."""
    return sg(jnp.min(x)) if not self.signed and self.bits > 1 else jnp.float32(0.0)

  def fake_quant(self, x, qparams, lam):
    qn, qp = self.levels
    g = 1.0 / math.sqrt(x.size * qp)
    m = self._shift(x)
    return blend(x, _lsq(x - m, self._alpha(qparams), qn, qp, g, self.binary) + m, lam)

  def int_quantize(self, x, qparams):
    qn, qp = self.levels
    alpha, m = self._alpha(qparams), self._shift(x)
    codes = jnp.sign(x) if self.binary else jnp.round(jnp.clip((x - m) / alpha, qn, qp))
    offset = None if self.signed or self.bits == 1 else m
    return IntActs(codes.astype(jnp.int8), 1.0 / alpha, offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _lsq(x: Array, alpha: Array, qn: int, qp: int, g: float, binary: bool) -> Array:
  """α clip(round(x/α), Qn, Qp) (``binary``: α sign(x)) with the LSQ gradients.

  Same values as autodiff through ``gs(α, g) r(clip(x / gs(α, g)))``: ∂/∂x = 1[inside];
  ∂/∂α = g Σ δ (round(u) - u) inside, g Σ δ Qn or Qp outside (``binary``: g Σ δ sign(x)).
  """
  return alpha * (jnp.sign(x) if binary else jnp.clip(jnp.round(x / alpha), qn, qp))


def _lsq_fwd(x, alpha, qn, qp, g, binary):
  return _lsq(x, alpha, qn, qp, g, binary), (x, alpha)


def _lsq_bwd(qn, qp, g, binary, res, ct):
  x, alpha = res
  u = x / alpha
  levels = jnp.clip(jnp.round(u), qn, qp)
  inside = (u >= qn) & (u <= qp)
  d_u = jnp.sign(u) if binary else jnp.where(inside, levels - u, levels)
  d_alpha = g * jnp.sum(ct * d_u)
  return jnp.where(inside, ct, 0.0), d_alpha.astype(alpha.dtype)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@functools.lru_cache(maxsize=None)
def weight_quantizer(spec: str, shard_axis: int = 1) -> WeightQuantizer:
  """Builds (and caches) the weight quantizer named by ``spec``."""
  q = WEIGHT_QUANTIZERS.build(spec)
  return dataclasses.replace(q, shard_axis=shard_axis) if q.granularity == "shard" else q


@functools.lru_cache(maxsize=None)
def act_quantizer(spec: str) -> ActQuantizer:
  """Builds (and caches) the activation quantizer named by ``spec``."""
  return ACT_QUANTIZERS.build(spec)


def validate_specs(weight_quant: str, act_quant: str) -> None:
  """Raises a clear error when either registry string is invalid."""
  for what, spec, build in (("weight_quant", weight_quant, weight_quantizer),
                            ("act_quant", act_quant, act_quantizer)):
    try:
      build(spec)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"Invalid {what}={spec!r}: {e}") from None


# ---------------------------------------------------------------------------------------
# The layer.
# ---------------------------------------------------------------------------------------


def layer_options(cfg, kind: str) -> Dict[str, Any]:
  """TernaryDense fields for projection ``kind`` of a TransformerConfig."""
  return dict(weight_quant=cfg.weight_quant, act_quant=cfg.act_quant,
              input_norm=bool(cfg.extra_rmsnorm or (cfg.subln and kind in SUBLN_KINDS)),
              norm_eps=cfg.norm_eps)


def shard_axis_of(kernel_axes: Tuple[str, str]) -> int:
  """The kernel axis tensor parallelism splits (0 for o/down, 1 for q/k/v/gate/up)."""
  return 0 if kernel_axes[0] in TENSOR_PARALLEL_AXES else 1


def rms_normalize(x: Array, gain: Array, eps: float) -> Array:
  """``gain ⊙ x / sqrt(mean(x²) + eps)`` in float32 (same math as layers.RMSNorm)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y * gain.astype(jnp.float32)


def unpack_codes(packed: Array, k: int) -> Array:
  """uint8 [..., ceil(K/4), N] -> int8 codes [..., K, N] (TQ2 layout, no gathers)."""
  parts = [(packed >> (2 * i)) & 3 for i in range(4)]
  codes = jnp.concatenate(parts, axis=-2)[..., :k, :]  # [..., K, N]
  return codes.astype(jnp.int8) - 1


def packed_matmul(x: Array, codes: Array, scale: Array, acts: Optional[IntActs],
                  precision: Any = None) -> Array:
  """``Σ_g s_g ⊙ (x^(g) T^(g)) (/ s_x)``: one partial dot per group of K, then scaled.

  x [..., K]; codes int8 [K, N]; scale [] / [N] / [a, N] with ``a`` groups along K.
  With int8 activations ``acts`` the dots are int8 × int8 → int32; with ``acts=None``
  (float activations, A16 methods) the codes are converted inside the dot and the scale
  goes on its output, so no f32 ``scale · T`` is built.
  """
  k, n = codes.shape
  scale = scale.astype(jnp.float32)
  scale = scale.reshape((-1, n) if scale.ndim == 2 else (1, -1))  # [a, N] or [1, 1|N]
  a = scale.shape[0]
  lead = x.shape[:-1]
  if acts is None:
    lhs, rhs, acc_type = x.astype(jnp.float32), codes.astype(jnp.float32), jnp.float32
  else:
    lhs, rhs, acc_type, precision = acts.q, codes, jnp.int32, None
  acc = jax.lax.dot_general(lhs.reshape(-1, a, k // a), rhs.reshape(a, k // a, n),
                            (((2,), (1,)), ((1,), (0,))),  # Contract K/a; batch groups.
                            precision=precision,
                            preferred_element_type=acc_type)  # [a, M, N]
  y = jnp.sum(acc.astype(jnp.float32) * scale[:, None, :], axis=0)  # [M, N]
  if acts is not None:
    y = y / acts.div.reshape(-1, 1)
  return y.reshape(*lead, n)


class TernaryDense(nn.Module):
  """Quantization-aware ternary linear layer with ``nn.Dense``'s parameters.

  Parameters: ``kernel`` [K, N] and ``bias`` [N] (same init and axes as
  ``layers.Dense``), plus the method's own (``w_alpha``, ``w_shift``, ``a_alpha``,
  ``norm_scale`` [K] when ``input_norm``). With a packed tree (``codes``, ``scale``,
  ``shift``, ``deadzone_bias``) it runs the integer inference path instead, and with a
  prepared one (``codes_u32``, ``scale_rows``, ...) the kernel path (``PACKED_FORMS``).
  """
  features: int
  kernel_axes: Tuple[str, str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  precision: Any = None
  weight_quant: str = "absmean"
  act_quant: str = "none"
  input_norm: bool = False
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, qlambda: Optional[Array] = None) -> Array:
    lam = jnp.asarray(1.0 if qlambda is None else qlambda, jnp.float32)
    k = x.shape[-1]
    wq = weight_quantizer(self.weight_quant, shard_axis_of(self.kernel_axes))
    aq = act_quantizer(self.act_quant)

    if self.input_norm:
      gain = self.param("norm_scale", nn.with_logical_partitioning(
          nn.initializers.ones, self.kernel_axes[:1]), (k,), self.param_dtype)
      x = rms_normalize(x, gain, self.norm_eps)  # [..., K]
    x32 = x.astype(jnp.float32)
    aparams = {name: self.param(name, nn.with_logical_partitioning(
        lambda _, n=name: aq.init_params(x32)[n], ()))
               for name in aq.param_shapes()}

    form = next((f for name, f in PACKED_FORMS.items()
                 if self.has_variable("params", name)), None)
    if form is not None:
      y, out_bias = getattr(self, form)(x32, aparams, aq)
    else:
      kernel = self.param("kernel", nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
          self.kernel_axes), (k, self.features), self.param_dtype)
      w32 = kernel.astype(jnp.float32)
      wparams = {name: self.param(name, nn.with_logical_partitioning(
          lambda _, n=name: wq.init_params(w32)[n],
          (None, self.kernel_axes[1] if shape[1] == self.features else None)))
                 for name, shape in wq.param_shapes((k, self.features)).items()}
      w_hat, out_bias = wq.fake_quant(w32, wparams, lam)  # [K, N]
      x_hat = aq.fake_quant(x32, aparams, lam)  # [..., K]
      y = layers.flat_dot(x_hat.astype(self.dtype), w_hat.astype(self.dtype),
                          precision=self.precision)  # [..., N]
      self._monitor(wq, w32, wparams)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.kernel_axes[1:]), (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    if out_bias is not None:
      y = y + out_bias.astype(self.dtype)
    return y

  def _packed(self, x32: Array, aparams: Dict[str, Array],
              aq: ActQuantizer) -> Tuple[Array, Optional[Array]]:
    """Integer inference from the TQ2 ``codes`` / ``scale`` (unpacked at every call).

    Returns (y [..., N], the dead-zone bias or None), like ``fake_quant``.
    """
    get = lambda name: self.get_variable("params", name)
    codes = unpack_codes(get("codes"), x32.shape[-1])  # [K, N] int8
    acts = aq.int_quantize(x32, aparams)
    y = packed_matmul(x32, codes, get("scale"), acts, self.precision)  # [..., N]
    if acts is not None and acts.offset is not None:  # Min-shift: m Σ_i Ŵ_i.
      ones = jnp.ones((1, codes.shape[0]), jnp.float32)
      y = y + acts.offset * packed_matmul(ones, codes, get("scale"), None)[0]
    return self._packed_terms(x32, acts, y)

  def _prepared(self, x32: Array, aparams: Dict[str, Array],
                aq: ActQuantizer) -> Tuple[Array, Optional[Array]]:
    """Inference from ``codes_u32`` / ``scale_rows`` (``packing.prepare_for_inference``).

    The matmul is ``ternary_kernel.matmul`` (the compiled kernel on CPU); int8
    activations go through it as exact small integers. Returns what ``_packed`` does.
    """
    get = lambda name: self.get_variable("params", name)
    k = x32.shape[-1]
    acts = aq.int_quantize(x32, aparams)
    rows = (x32 if acts is None else acts.q.astype(jnp.float32)).reshape(-1, k)  # [M, K]
    m = rows.shape[0]
    if acts is not None and acts.offset is not None:  # A row of ones: Σ_i Ŵ_i.
      rows = jnp.concatenate([rows, jnp.ones((1, k), jnp.float32)])
    out = ternary_kernel.matmul(rows, get("codes_u32"), get("scale_rows"), self.features,
                                precision=self.precision)  # [M (+1), N]
    y = out[:m]
    if acts is not None:
      y = y / acts.div.reshape(-1, 1)
      if acts.offset is not None:  # Min-shift: m Σ_i Ŵ_i.
        y = y + acts.offset * out[m]
    return self._packed_terms(x32, acts, y.reshape(*x32.shape[:-1], self.features))

  def _packed_terms(self, x32: Array, acts: Optional[IntActs],
                    y: Array) -> Tuple[Array, Optional[Array]]:
    """Adds DLT's ``shift`` term to y [..., N]; returns (y, the dead-zone bias or None)."""
    get = lambda name: self.get_variable("params", name)
    if self.has_variable("params", "shift"):  # DLT: γ Σ_i x̂_i per group.
      shift = get("shift")
      shift = shift.reshape((-1, self.features) if shift.ndim == 2 else (1, -1))
      a = shift.shape[0]
      x_hat = x32 if acts is None else acts.value()
      sums = x_hat.reshape(*x_hat.shape[:-1], a, -1).sum(-1)  # [..., a]
      y = y + jnp.einsum("...a,an->...n", sums, jnp.broadcast_to(
          shift, (a, self.features)), precision=jax.lax.Precision.HIGHEST)
    deadzone = get("deadzone_bias") if self.has_variable("params", "deadzone_bias") else None
    return y.astype(self.dtype), deadzone

  def _monitor(self, wq: WeightQuantizer, w32: Array, wparams: Dict[str, Array]):
    """Sows the zero fraction, code histogram (-1, 0, +1) and mean scale."""
    if isinstance(wq, NoWeightQuant) or not self.is_mutable_collection("intermediates"):
      return
    q = wq.quantize(sg(w32), jax.tree.map(sg, wparams))
    hist = jnp.stack([jnp.sum(q.codes == c) for c in (-1, 0, 1)]).astype(jnp.float32)
    self.sow("intermediates", "zero_frac", hist[1] / q.codes.size)
    self.sow("intermediates", "code_hist", hist)  # [3]
    self.sow("intermediates", "scale", jnp.mean(q.scale))
