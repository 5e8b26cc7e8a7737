"""Training losses: masked next-token NLL (SFT, RFT, FCP) and GRPO, by registry name.

Batch format (host pipeline, ``fcp_jax/data/input_pipeline.py``)::

    tokens      [B, T] int32
    positions   [B, T] int32
    segment_ids [B, T] int32   (0 = padding)
    loss_mask   [B, T] float32 (1 = token t is a response token predicted from t-1)

GRPO adds ``advantages`` [B] (or ``scores`` [B] and the loss's ``group_size``),
``old_logprobs`` [B, T] and optionally ``ref_logprobs`` [B, T]; per-token log-prob
arrays are aligned with ``tokens`` (entry t is ``log p(tokens[t] | tokens[<t])``, entry 0
is unused).

A loss is an object built from a config string (``LOSSES.build("nll(aggregation=
'seq-mean-token-sum')")``) with two methods:

* ``prepare(batch) -> batch``: runs once on the whole (per-replica) batch before it is
  split into micro-batches (GRPO turns ``scores`` into ``advantages`` here, so groups
  are never split);
* ``__call__(logits, batch) -> LossTerms``: sums over the tokens of a micro-batch;
  it is ``from_logprobs(*target_stats(logits, tokens), batch)``, and the training step
  calls ``from_logprobs`` with ``chunked_target_stats`` instead when the model config
  sets ``loss_chunk`` (float32 [B, T, V] logits are then never materialised).

``LossTerms`` keeps sums rather than means so that micro-batches (gradient
accumulation) and data-parallel replicas combine exactly: the loss of the full batch is
``sum(numerator) / sum(denominator)`` and the denominator never depends on parameters.
``finalize_metrics`` turns summed terms into the reported metrics.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from fcp_jax.registry import Registry

Array = jax.Array
Batch = Mapping[str, Array]

LOSSES = Registry("loss")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum")
REQUIRED_FIELDS = ("tokens", "loss_mask")


@flax.struct.dataclass
class LossTerms:
  """Summed loss terms of one (micro-)batch.

  Attributes:
    numerator: differentiable sum; the loss is ``numerator / denominator``.
    denominator: parameter-independent normaliser (tokens or sequences).
    tokens: number of loss tokens.
    sequences: number of sequences (response spans) with at least one loss token.
    token_sums: metric sums over loss tokens, reported as ``value / tokens``.
  """
  numerator: Array
  denominator: Array
  tokens: Array
  sequences: Array
  token_sums: Dict[str, Array]


def _check_batch(batch: Batch, fields, where: str):
  missing = [k for k in fields if k not in batch]
  if missing:
    raise KeyError(f"{where}: batch lacks fields {missing}; it has {sorted(batch)}.")
  b, t = batch["tokens"].shape
  for k in fields:
    if k in ("tokens", "loss_mask", "segment_ids", "positions", "old_logprobs",
             "ref_logprobs") and batch[k].shape != (b, t):
      raise ValueError(f"{where}: batch[{k!r}] has shape {batch[k].shape}, "
                       f"expected {(b, t)} like batch['tokens'].")


def target_mask(batch: Batch) -> Array:
  """[B, T-1] float32: 1 where ``tokens[:, 1:]`` is a loss target.

  ``loss_mask[:, 1:]``, further restricted (when ``segment_ids`` is present) to targets
  in the same non-padding segment as their context token, so a packed row never predicts
  across a document boundary.
  """
  mask = batch["loss_mask"][:, 1:].astype(jnp.float32)  # [B, T-1]
  if "segment_ids" in batch:
    seg = batch["segment_ids"]
    mask = mask * ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0))  # [B, T-1]
  return mask


def count_sequences(mask: Array) -> Array:
  """Number of contiguous runs of ones in ``mask`` [B, T'] (one per response span)."""
  prev = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))  # [B, T']
  return jnp.sum(mask * (1.0 - prev))


def predictions(logits: Array, targets: Array) -> Tuple[Array, Array]:
  """Float32 ``log p(targets)`` and argmax hits (bool), [B, C] each, of [B, C, V] logits."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, C, V]
  correct = jnp.argmax(logits, axis=-1) == targets  # [B, C]
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], correct


def target_stats(logits: Array, tokens: Array) -> Tuple[Array, Array]:
  """Log-probs and argmax hits [B, T-1] of the targets ``tokens[:, 1:]``."""
  return predictions(logits[:, :-1], tokens[:, 1:])


def token_logprobs(logits: Array, tokens: Array) -> Array:
  """[B, T-1] float32: ``log p(tokens[:, 1:])`` under ``logits[:, :-1]``."""
  return target_stats(logits, tokens)[0]


def map_chunks(fn: Callable[..., Any], arrays: Tuple[Array, ...], chunk: int) -> Any:
  """``fn`` over ``chunk`` positions at a time: [B, N, ...] arrays -> [B, N] outputs.

  ``fn`` maps a tuple of [B, C, ...] slices of ``arrays`` to a tree of [B, C] arrays;
  N is padded up to a multiple of ``chunk``. A ``lax.map`` over chunks with each chunk
  under ``jax.checkpoint``: the forward keeps only the [B, N] results and the backward
  recomputes one chunk at a time.
  """
  b, n = arrays[0].shape[:2]
  k = -(-n // chunk)
  pad = k * chunk - n

  def split(a):  # [B, N, ...] -> [k, B, C, ...]
    a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return a.reshape((b, k, chunk) + a.shape[2:]).swapaxes(0, 1)

  out = jax.lax.map(jax.checkpoint(fn), tuple(split(a) for a in arrays))  # [k, B, C]
  return jax.tree.map(lambda o: o.swapaxes(0, 1).reshape(b, k * chunk)[:, :n], out)


def chunked_target_stats(hidden: Array, tokens: Array,
                         project: Callable[[Array], Array],
                         chunk: int) -> Tuple[Array, Array]:
  """``target_stats`` from final hidden states, projecting ``chunk`` positions at a time.

  Args:
    hidden: [B, T, D] states before the output head.
    tokens: [B, T] int32.
    project: the output head, [B, C, D] -> float32 logits [B, C, V].
    chunk: positions per chunk (``map_chunks``).
  """
  stats = lambda xy: predictions(project(xy[0]), xy[1])  # [B, C] each
  return map_chunks(stats, (hidden[:, :-1], tokens[:, 1:]), chunk)  # [B, T-1] each


def _aggregate(per_token: Array, mask: Array, aggregation: str, correct: Array,
               token_sums: Optional[Dict[str, Array]] = None) -> LossTerms:
  """Sums ``per_token`` [B, T-1] over ``mask`` with the chosen denominator."""
  num_tokens = jnp.sum(mask)
  sequences = count_sequences(mask)
  denominator = {"token-mean": num_tokens, "seq-mean-token-sum": sequences}[aggregation]
  sums = {"accuracy": jnp.sum(correct * mask)}
  sums.update(token_sums or {})
  return LossTerms(numerator=jnp.sum(per_token * mask),
                   denominator=jax.lax.stop_gradient(denominator),
                   tokens=num_tokens, sequences=sequences, token_sums=sums)


def _check_aggregation(aggregation: str):
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"Unknown loss aggregation {aggregation!r}; options: {AGGREGATIONS}.")


@dataclasses.dataclass(frozen=True)
class NLL:
  """Masked next-token negative log-likelihood on response tokens.

  Serves SFT (prompt -> reference answer), RFT (correct samples only) and FCP
  (response given ``<EF>c</EF>`` + prompt): the objectives differ only in the data.

  Attributes:
    aggregation: ``token-mean`` (mean over all loss tokens of the batch) or
      ``seq-mean-token-sum`` (sum over each response, mean over responses).
  """
  aggregation: str = "token-mean"

  def __post_init__(self):
    _check_aggregation(self.aggregation)

  def prepare(self, batch: Batch) -> Batch:
    _check_batch(batch, REQUIRED_FIELDS, "nll loss")
    return batch

  def __call__(self, logits: Array, batch: Batch) -> LossTerms:
    return self.from_logprobs(*target_stats(logits, batch["tokens"]), batch)

  def from_logprobs(self, logp: Array, correct: Array, batch: Batch) -> LossTerms:
    """The terms from target log-probs and argmax hits [B, T-1] (``target_stats``)."""
    return _aggregate(-logp, target_mask(batch), self.aggregation, correct)


LOSSES.register("nll")(NLL)
# The three offline objectives are the same NLL on differently built data.
for _name in ("sft", "rft", "fcp"):
  LOSSES.register(_name)(NLL)


def grpo_advantages(scores: Array, group_size: int, eps: float = 1e-6,
                    valid: Optional[Array] = None) -> Array:
  """Group-normalised advantages [B]: ``(s - mean_g) / (std_g + eps)``.

  ``scores`` [B] holds ``B / group_size`` consecutive groups (the rollouts of one prompt
  are adjacent). The standard deviation is the unbiased one (as in verl's GRPO).
  ``valid`` [B] (optional) marks the rows whose score exists (the feedback env
  answered): the mean and std of a group are taken over its valid rows only, and
  invalid rows, or groups with fewer than two valid rows, get advantage 0.
  """
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim != 1:
    raise ValueError(f"grpo_advantages: scores must be [B], got shape {scores.shape}.")
  if group_size < 2 or scores.shape[0] % group_size:
    raise ValueError(f"grpo_advantages: group_size={group_size} must be >= 2 and divide "
                     f"the batch size {scores.shape[0]}.")
  groups = scores.reshape(-1, group_size)  # [B/G, G]
  if valid is None or bool(jnp.all(jnp.asarray(valid))):
    mean = jnp.mean(groups, axis=1, keepdims=True)  # [B/G, 1]
    std = jnp.std(groups, axis=1, keepdims=True, ddof=1)  # [B/G, 1]
    return ((groups - mean) / (std + eps)).reshape(-1)  # [B]
  ok = jnp.asarray(valid, jnp.float32).reshape(groups.shape)  # [B/G, G]
  count = jnp.sum(ok, axis=1, keepdims=True)  # [B/G, 1]
  mean = jnp.sum(groups * ok, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
  var = jnp.sum(ok * (groups - mean) ** 2, axis=1, keepdims=True) / jnp.maximum(
      count - 1.0, 1.0)
  adv = (groups - mean) / (jnp.sqrt(var) + eps) * ok  # [B/G, G]
  return jnp.where(count >= 2, adv, 0.0).reshape(-1)  # [B]


@dataclasses.dataclass(frozen=True)
class GRPO:
  """Clipped policy-gradient surrogate with group-normalised advantages (Shao et al.).

  Per response token: ``-min(r A, clip(r, 1-eps_lo, 1+eps_hi) A) + kl_coef * k3`` with
  ``r = exp(logp - old_logprobs)`` and the k3 estimator ``exp(q) - q - 1``,
  ``q = ref_logprobs - logp``. Without ``old_logprobs`` the step is on-policy
  (``old = stop_gradient(logp)``, so ``r = 1``).

  Attributes:
    group_size: rollouts per prompt, used when the batch has ``scores`` but no
      ``advantages``.
    clip_eps: lower clip range; ``clip_eps_high`` defaults to the same value.
    kl_coef: weight of the KL penalty to the reference policy (needs ``ref_logprobs``).
    aggregation: as for ``NLL``.
    adv_eps: epsilon of the advantage normalisation.
  """
  group_size: int = 0
  clip_eps: float = 0.2
  clip_eps_high: Optional[float] = None
  kl_coef: float = 0.0
  aggregation: str = "token-mean"
  adv_eps: float = 1e-6

  def __post_init__(self):
    _check_aggregation(self.aggregation)

  def prepare(self, batch: Batch) -> Batch:
    _check_batch(batch, REQUIRED_FIELDS, "grpo loss")
    batch = dict(batch)
    if "advantages" not in batch:
      if "scores" not in batch:
        raise KeyError("grpo loss: batch needs 'advantages' [B] or 'scores' [B]; "
                       f"it has {sorted(batch)}.")
      if not self.group_size:
        raise ValueError("grpo loss: batch has 'scores' but the loss has no group_size; "
                         "use e.g. \"grpo(group_size=4)\".")
      batch["advantages"] = grpo_advantages(batch["scores"], self.group_size,
                                            self.adv_eps)
    if self.kl_coef and "ref_logprobs" not in batch:
      raise KeyError(f"grpo loss: kl_coef={self.kl_coef} needs batch['ref_logprobs'].")
    b = batch["tokens"].shape[0]
    if batch["advantages"].shape != (b,):
      raise ValueError(f"grpo loss: advantages has shape {batch['advantages'].shape}, "
                       f"expected ({b},).")
    return batch

  def __call__(self, logits: Array, batch: Batch) -> LossTerms:
    return self.from_logprobs(*target_stats(logits, batch["tokens"]), batch)

  def from_logprobs(self, logp: Array, correct: Array, batch: Batch) -> LossTerms:
    """The terms from target log-probs and argmax hits [B, T-1] (``target_stats``)."""
    mask = target_mask(batch)  # [B, T-1]
    old = (batch["old_logprobs"][:, 1:] if "old_logprobs" in batch
           else jax.lax.stop_gradient(logp))  # [B, T-1]
    adv = batch["advantages"].astype(jnp.float32)[:, None]  # [B, 1]
    ratio = jnp.exp(logp - old)  # [B, T-1]
    high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
    clipped = jnp.clip(ratio, 1.0 - self.clip_eps, 1.0 + high)  # [B, T-1]
    surrogate = jnp.minimum(ratio * adv, clipped * adv)  # [B, T-1]
    per_token = -surrogate
    sums = {"clip_frac": jnp.sum((ratio != clipped) * mask),
            "ratio": jnp.sum(ratio * mask)}
    if self.kl_coef:
      q = batch["ref_logprobs"][:, 1:] - logp  # [B, T-1]
      kl = jnp.exp(q) - q - 1.0  # [B, T-1], k3 estimator, >= 0
      per_token = per_token + self.kl_coef * kl
      sums["kl"] = jnp.sum(kl * mask)
    return _aggregate(per_token, mask, self.aggregation, correct, sums)


LOSSES.register("grpo")(GRPO)


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
  """Sum of two ``LossTerms`` (micro-batch accumulation)."""
  return jax.tree.map(jnp.add, a, b)


def finalize_metrics(terms: LossTerms) -> Dict[str, Array]:
  """Reported metrics from summed terms: loss, tokens, sequences, token means."""
  tokens = terms.tokens
  out = {"loss": terms.numerator / jnp.maximum(terms.denominator, 1.0),
         "tokens": tokens, "sequences": terms.sequences}
  for k, v in terms.token_sums.items():
    out[k] = v / jnp.maximum(tokens, 1.0)
  return out


def build(spec: str) -> Any:
  """``LOSSES.build(spec)`` with a clearer error for bad arguments."""
  try:
    return LOSSES.build(spec)
  except TypeError as e:
    raise ValueError(f"Bad loss spec {spec!r}: {e}.") from None
