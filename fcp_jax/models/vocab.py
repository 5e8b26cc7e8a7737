"""Vocabulary growth: new embedding rows for added tokens, padding to a multiple.

    tok, cfg, params = add_condition_tokens(tok, cfg, params, rng, pad_to_multiple=128)

``grow_vocab`` / ``add_condition_tokens`` add rows to the input embedding (and the
untied head), drawn from a normal with the mean and covariance of the existing rows
(Cholesky in float64 with jitter, seeded by ``rng``), so old logits are untouched and
new tokens start "typical". ``pad_to_multiple`` rounds the vocabulary up for sharding;
padding rows are zero and never produced: no tokenizer id reaches them, and
``sampling.sampler.Sampler`` masks logits at or beyond ``tokenizer.vocab_size``.
"""

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import hf
from fcp_jax.models import transformer as transformer_lib

Array = jax.Array
Path = Tuple[str, ...]
TransformerConfig = transformer_lib.TransformerConfig

# hf's private helper, shared (not part of either module's API).
_fmt = hf._fmt  # pylint: disable=protected-access


def _round_up(n: int, multiple: int) -> int:
  if multiple < 1:
    raise ValueError(f"pad_to_multiple must be >= 1, got {multiple}.")
  return -(-n // multiple) * multiple


def _get_leaf(params: Any, path: Path) -> Any:
  node = params
  for k in path:
    if k not in node:
      raise KeyError(f"Params have no {_fmt(path)} (missing {k!r}).")
    node = node[k]
  return node


def _set_leaf(params: Any, path: Path, value: Any) -> Dict[str, Any]:
  """A copy of ``params`` with ``path`` replaced (boxes kept); dicts copied on the path."""
  head, rest = path[0], path[1:]
  new = dict(params)
  if rest:
    new[head] = _set_leaf(params[head], rest, value)
  else:
    old = params[head]
    new[head] = (old.replace_boxed(value) if isinstance(old, nn.meta.AxisMetadata)
                 else value)
  return new


@jax.jit
def _moments(table: Array, rows: Array) -> Tuple[Array, Array]:
  """Mean [D] and (biased) covariance [D, D] of ``table[rows]``, in float32."""
  x = table[rows].astype(jnp.float32)                                       # [R, D]
  mean = jnp.mean(x, axis=0)                                                # [D]
  centred = x - mean                                                        # [R, D]
  cov = jnp.dot(centred.T, centred,
                precision=jax.lax.Precision.HIGHEST) / x.shape[0]           # [D, D]
  return mean, cov


def sample_like_rows(table: Array, num: int, rng: Array, *,
                     rows: Optional[np.ndarray] = None, jitter: float = 1e-6) -> Array:
  """``num`` rows [num, D] ~ N(mean, covariance) of ``table[rows]`` (default: all rows).

  Moments are computed in float32 on the table's device; the Cholesky factor in float64
  with a relative ``jitter`` on the diagonal (raised tenfold until it factorises).
  """
  table = jnp.asarray(table)
  rows = np.arange(table.shape[0]) if rows is None else np.asarray(rows)
  if rows.size < 2:
    raise ValueError(f"Need at least 2 rows to estimate a covariance, got {rows.size}.")
  d = table.shape[1]
  mean, cov = _moments(table, jnp.asarray(rows, jnp.int32))
  mean64, cov64 = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  scale = max(float(np.mean(np.diag(cov64))), 1e-12)
  for _ in range(8):
    try:
      chol = np.linalg.cholesky(cov64 + jitter * scale * np.eye(d))        # [D, D]
      break
    except np.linalg.LinAlgError:
      jitter *= 10
  else:
    raise ValueError("Embedding covariance is not positive definite even with jitter.")
  z = np.asarray(jax.random.normal(rng, (num, d), jnp.float32), np.float64)  # [num, D]
  return jnp.asarray(mean64 + z @ chol.T, table.dtype)                      # [num, D]


@functools.partial(jax.jit, static_argnums=(1,))
def _place_rows(table: Array, total: int, ids: Array, rows: Array) -> Array:
  """[V, D] -> [total, D] with ``rows`` [n, D] written at ``ids`` [n], other new rows 0."""
  out = jnp.zeros((total, table.shape[1]), table.dtype)                    # [V', D]
  out = jax.lax.dynamic_update_slice(out, table, (0, 0))
  return out.at[ids].set(rows.astype(table.dtype))


def _grow_table(table: Array, total: int, init_ids: np.ndarray, stat_rows: np.ndarray,
                rng: Array) -> Array:
  """[V, D] -> [total, D]: ``init_ids`` rows sampled, other new rows zero."""
  table = jnp.asarray(table)
  rows = (sample_like_rows(table, len(init_ids), rng, rows=stat_rows) if len(init_ids)
          else jnp.zeros((0, table.shape[1]), table.dtype))
  return _place_rows(table, total, jnp.asarray(init_ids, jnp.int32), rows)


def grow_vocab(cfg: TransformerConfig, params: Any, rng: Array, *, vocab_size: int,
               init_ids: Sequence[int] = (), pad_to_multiple: int = 1
               ) -> Tuple[TransformerConfig, Any]:
  """Grows the embedding (and untied head) to ``vocab_size`` real ids, padded.

  Rows ``cfg.vocab_size .. vocab_size-1`` and ``init_ids`` (existing rows to re-draw,
  e.g. untrained tokens of a pre-padded vocabulary) are drawn from the mean and
  covariance of the other existing rows (``sample_like_rows``); the embedding and the
  head each use their own moments. Padding rows up to a multiple of ``pad_to_multiple``
  are zero. Params may be boxed or plain; other leaves are shared, not copied.
  """
  old = cfg.vocab_size
  total = _round_up(max(vocab_size, old), pad_to_multiple)
  init = set(int(i) for i in init_ids)
  bad = sorted(i for i in init if not 0 <= i < vocab_size)
  if bad:
    raise ValueError(f"init_ids {bad[:5]} lie outside the vocabulary [0, {vocab_size}).")
  init_ids = np.array(sorted(init | set(range(old, vocab_size))), np.int64)
  stat_rows = np.setdiff1d(np.arange(old), init_ids)
  rng_embed, rng_head = jax.random.split(rng)

  def grow(path, transpose, key):
    leaf = _get_leaf(params, path)
    value = nn.unbox(leaf)
    if transpose:
      value = value.T                                                       # [V, D]
    if value.shape[0] != old:
      raise ValueError(f"{_fmt(path)} has {value.shape[0]} vocabulary rows but "
                       f"cfg.vocab_size is {old}.")
    value = _grow_table(value, total, init_ids, stat_rows, key)
    return value.T if transpose else value

  params = _set_leaf(params, ("embed", "embedding"),
                     grow(("embed", "embedding"), False, rng_embed))
  if not cfg.tie_embeddings:
    params = _set_leaf(params, ("lm_head", "kernel"),
                       grow(("lm_head", "kernel"), True, rng_head))
  return cfg.replace(vocab_size=total), params


def add_condition_tokens(tokenizer, cfg: TransformerConfig, params: Any, rng: Array, *,
                         tokens: Sequence[str] = (tokenizer_lib.EF_OPEN,
                                                  tokenizer_lib.EF_CLOSE),
                         pad_to_multiple: int = 1, reinit_existing: bool = False):
  """Makes ``tokens`` (``<EF>``, ``</EF>``) usable by a pretrained model.

  Adds those the tokenizer lacks (a new ``HFTokenizer`` over a copy of the underlying
  tokenizer; the one passed in is left alone) and grows the embedding to
  ``tokenizer.vocab_size`` with ``grow_vocab``. An ``HFTokenizer`` already appends the
  project's specials at construction, so usually only the model grows. With
  ``reinit_existing`` the rows of tokens the tokenizer added that fall inside the
  model's current vocabulary (a pre-padded one) are re-drawn too.

  Returns:
    (tokenizer, cfg, params) with ``cfg.vocab_size >= tokenizer.vocab_size``.
  """
  missing = []
  for t in tokens:
    try:
      tokenizer.token_to_id(t)
    except KeyError:
      missing.append(t)
  if missing:
    if not isinstance(tokenizer, tokenizer_lib.HFTokenizer):
      raise ValueError(f"{type(tokenizer).__name__} lacks {missing} and cannot grow; "
                       f"use an HFTokenizer.")
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    raw = Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    previously_added = tuple(tokenizer.added_tokens)
    tokenizer = tokenizer_lib.HFTokenizer(raw, pad_token=tokenizer.pad_token,
                                          required=tuple(tokens))
    tokenizer.added_tokens = previously_added + tuple(tokenizer.added_tokens)
  init_ids = ()
  if reinit_existing:
    init_ids = tuple(i for i in (tokenizer.token_to_id(t) for t in
                                 getattr(tokenizer, "added_tokens", ()))
                     if i < cfg.vocab_size)
  cfg, params = grow_vocab(cfg, params, rng, vocab_size=tokenizer.vocab_size,
                           init_ids=init_ids, pad_to_multiple=pad_to_multiple)
  return tokenizer, cfg, params

