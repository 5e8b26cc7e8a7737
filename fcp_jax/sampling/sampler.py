"""Batched sampling with an explicit KV cache: one prefill, one jitted ``while_loop``.

    sampler = Sampler(Transformer(cfg), tokenizer)
    out = sampler.sample(params, ["What is 2+3?"], rng, max_new_tokens=32,
                         method="top_p(p=0.95, t=1.0)", num_samples=4)
    out.tokens    # [B*n, N] generated ids (pad after the end token)
    out.lengths   # [B*n] generated tokens including the end token
    out.logprobs  # [B*n, N] log pi(token) under the model's own distribution (T=1)
    out.text      # decoded responses without the end token

Prompts (token lists or strings) are left-padded to a bucketed length; padding has
segment id 0 and each row's positions start at 0 on its first real token, so a batch
samples exactly what each prompt alone would. The prompt is prefilled once and its
cache repeated ``num_samples`` times (rows ``i*n .. i*n+n-1`` belong to prompt ``i``).
Decoding is a ``lax.while_loop`` that stops when every row has emitted an end token;
its state, cache included, is donated to the decode call. The prefill projects only the
last position's logits, and the Gumbel noise of every step is drawn before the loop
(``Pick.with_noise``, up to ``NOISE_BYTES``): the same tokens and logprobs as drawing
``jax.random.categorical(fold_in(rng, step), logits)`` at each step, with less work.

With ``parallel`` (a ``training.sharding`` strategy, ``sharding.build(config.parallel)``)
the prompt rows are split over its batch devices (``sample_sharding``; rows padded with
copies of the first prompt to a multiple of the shards, and dropped after), calls run
in its context, and ``params`` must be placed by it (``par.shardings`` of the param
specs): each device, and each process of a multi-process run, decodes its share of the
rows, and the outputs are gathered. Every process passes the same prompts. Rows do not
depend on the padding (the noise of row ``r`` is the same at any batch size), but the
matmuls of a smaller per-device batch may round differently (~1e-7 in logprobs).

Logits of ids at or beyond ``valid_vocab`` (the tokenizer's size when the model's
vocabulary is padded) are masked out, so such ids are never sampled.

Sampling methods are registry strings (``SAMPLING_METHODS``): ``greedy``,
``temperature(t=...)``, ``top_k(k=..., t=...)``, ``top_p(p=..., t=...)``.

``params`` may be a ternary model's packed tree prepared for inference
(``packing.load_packed(path, prepare=True)``): its layers decode the 2-bit codes inside
the matmul (``models/ternary_kernel.py``); greedy decoding gives the latent params' tokens.
"""

import contextlib
import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from fcp_jax import distributed
from fcp_jax import registry
from fcp_jax.models import transformer as transformer_lib

Array = jax.Array
SAMPLING_METHODS = registry.Registry("sampling method")
_NEG = -1e30
# The most Gumbel noise (bytes) the decoding loop draws up front, for all its steps.
NOISE_BYTES = 64 * 2**20


def top_k_logits(logits: Array, k: int) -> Array:
  """Keeps the ``k`` largest logits of each row [B, V]; the rest become -inf-like."""
  kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
  return jnp.where(logits < kth, _NEG, logits)


def top_p_logits(logits: Array, p: float) -> Array:
  """Keeps the smallest set of tokens whose probability mass reaches ``p`` (nucleus)."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V] descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly larger tokens
  keep = mass_before < p  # The top token is always kept (mass_before = 0).
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, _NEG, logits)


@dataclasses.dataclass(frozen=True)
class Pick:
  """A sampling rule: ``argmax(transform(logits) + Gumbel noise)``, or no noise (greedy).

  ``pick(logits [R, V], rng)`` draws ``jax.random.categorical(rng, transform(logits))``
  (the argmax when not ``stochastic``). ``with_noise(logits, noise)`` draws the same
  token given ``noise = jax.random.gumbel(rng, [R, V])``, which lets the decoding loop
  draw the noise of every step at once (``Sampler._decode``).
  """
  transform: Callable[[Array], Array]  # logits [R, V] -> the logits sampled from [R, V]
  stochastic: bool = True

  def __call__(self, logits: Array, rng: Array) -> Array:
    logits = self.transform(logits)
    if not self.stochastic:
      return jnp.argmax(logits, axis=-1)  # [R]
    return jax.random.categorical(rng, logits, axis=-1)  # [R]

  def with_noise(self, logits: Array, noise: Optional[Array]) -> Array:
    logits = self.transform(logits)  # [R, V]
    return jnp.argmax(logits if noise is None else noise + logits, axis=-1)  # [R]


@SAMPLING_METHODS.register("greedy")
def greedy() -> Pick:
  return Pick(lambda logits: logits, stochastic=False)


@SAMPLING_METHODS.register("temperature")
def temperature(t: float = 1.0) -> Pick:
  if t <= 0:
    return greedy()
  return Pick(lambda logits: logits / t)


@SAMPLING_METHODS.register("top_k")
def top_k(k: int, t: float = 1.0) -> Pick:
  if k < 1:
    raise ValueError(f"top_k needs k >= 1, got {k}.")
  return Pick(lambda logits: top_k_logits(logits / t, k))


@SAMPLING_METHODS.register("top_p")
def top_p(p: float, t: float = 1.0) -> Pick:
  if not 0 < p <= 1:
    raise ValueError(f"top_p needs 0 < p <= 1, got {p}.")
  return Pick(lambda logits: top_p_logits(logits / t, p))


def _pad_rows(rows: np.ndarray, count: int) -> np.ndarray:
  """``rows`` [B, ...] followed by copies of ``rows[0]`` up to ``count`` rows."""
  if count <= len(rows):
    return rows
  return np.concatenate([rows, np.repeat(rows[:1], count - len(rows), axis=0)])


def _row_shards(sharding: jax.sharding.Sharding) -> int:
  """How many parts ``sharding`` splits axis 0 (the rows) of an array into."""
  n = sharding.num_devices
  return len({index[0].start for index in sharding.devices_indices_map((n, 1)).values()})


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray        # [B*n, N] int32
  lengths: np.ndarray       # [B*n] int32, end token included
  logprobs: np.ndarray      # [B*n, N] float32, 0 after the end
  text: Optional[List[str]]
  prompt_index: np.ndarray  # [B*n] index of the prompt each row answers

  def response_ids(self, i: int) -> List[int]:
    """Generated ids of row ``i``, end token included."""
    return self.tokens[i, :self.lengths[i]].tolist()


class Sampler:
  """Samples from a ``Transformer``; compiled functions are cached per shape/method."""

  def __init__(self, model: transformer_lib.Transformer, tokenizer=None, *,
               end_ids: Optional[Sequence[int]] = None, pad_id: Optional[int] = None,
               prompt_bucket: int = 16, valid_vocab: Optional[int] = None,
               parallel: Any = None):
    self.model = model
    self.parallel = parallel
    # Prompt rows are padded to a multiple of this: the parts axis 0 is split into.
    self.row_shards = 1 if parallel is None else _row_shards(parallel.sample_sharding)
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    if end_ids is None:
      if tokenizer is None:
        raise ValueError("Sampler needs end_ids or a tokenizer that knows them.")
      end_ids = tokenizer.eos_ids
    self.end_ids = tuple(int(i) for i in end_ids)
    self.pad_id = int(pad_id if pad_id is not None else
                      (tokenizer.pad_id if tokenizer is not None else 0))
    self.prompt_bucket = prompt_bucket
    if valid_vocab is None:
      valid_vocab = tokenizer.vocab_size if tokenizer is not None else self.cfg.vocab_size
    if valid_vocab > self.cfg.vocab_size:
      raise ValueError(f"Tokenizer has {valid_vocab} ids but the model only "
                       f"{self.cfg.vocab_size}: grow the embedding first.")
    self.valid_vocab = valid_vocab
    self._compiled = {}

  # ---------------------------------------------------------------- host side
  def _encode(self, prompts) -> List[List[int]]:
    out = []
    for i, p in enumerate(prompts):
      if isinstance(p, str):
        if self.tokenizer is None:
          raise ValueError("String prompts need a tokenizer.")
        p = self.tokenizer.encode(p)
      p = [int(t) for t in p]
      if not p:
        raise ValueError(f"Prompt {i} is empty.")
      out.append(p)
    return out

  def left_pad(self, prompts: Sequence[Sequence[int]]):
    """Returns tokens and segment ids [B, P], P rounded up to the bucket size."""
    longest = max(len(p) for p in prompts)
    width = -(-longest // self.prompt_bucket) * self.prompt_bucket
    tokens = np.full((len(prompts), width), self.pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, width - len(p):] = p
      segments[i, width - len(p):] = 1
    return tokens, segments

  def sample(self, params, prompts: Sequence[Union[str, Sequence[int]]], rng: Array, *,
             max_new_tokens: int, method: str = "greedy", num_samples: int = 1,
             qlambda=None, min_prompts: int = 0) -> SampleOutput:
    """Samples ``num_samples`` responses of at most ``max_new_tokens`` per prompt.

    ``min_prompts``: the batch is padded with copies of the first prompt to at least
    this many (dropped after), so a short last chunk runs the full chunks' program
    instead of compiling its own.
    """
    if max_new_tokens < 1 or num_samples < 1:
      raise ValueError("max_new_tokens and num_samples must be >= 1.")
    tokens, segments = self.left_pad(self._encode(prompts))  # [B, P]
    if min_prompts > len(tokens):
      tokens, segments = (_pad_rows(x, min_prompts) for x in (tokens, segments))
    fns = self._functions(method, max_new_tokens, num_samples)
    context = contextlib.nullcontext()
    if self.parallel is not None:
      tokens, segments = self.place_rows(tokens), self.place_rows(segments)
      context = self.parallel.context()
    with context:
      state = fns["prefill"](params, tokens, segments, qlambda)
      state = fns["decode"](params, state, rng, qlambda)
    rows = len(prompts) * num_samples  # Padding rows dropped.
    out_tokens, lengths, logprobs = (x[:rows] for x in distributed.fetch(
        (state["out"], state["length"], state["logprobs"])))
    text = None
    if self.tokenizer is not None:
      text = [self.tokenizer.decode(self._strip_end(row[:n]))
              for row, n in zip(out_tokens, lengths)]
    return SampleOutput(out_tokens, lengths, logprobs, text,
                        np.repeat(np.arange(len(prompts)), num_samples))

  def place_rows(self, rows: np.ndarray) -> Array:
    """Global rows [B, ...] (the same on every process) -> an array split over
    ``parallel.sample_sharding``, padded with copies of row 0 to a multiple of the
    shards."""
    rows = _pad_rows(rows, -(-len(rows) // self.row_shards) * self.row_shards)
    return jax.make_array_from_callback(rows.shape, self.parallel.sample_sharding,
                                        lambda index: rows[index])

  def _strip_end(self, ids):
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] in self.end_ids else ids

  # -------------------------------------------------------------- device side
  def jitted(self, method: str, max_new_tokens: int, num_samples: int) -> dict:
    """The jitted ``prefill`` and ``decode`` that ``sample`` runs (for AOT lowering)."""
    return self._functions(method, max_new_tokens, num_samples)

  def _functions(self, method: str, max_new: int, num_samples: int):
    key = (method, max_new, num_samples)
    if key not in self._compiled:
      pick = SAMPLING_METHODS.build(method)
      self._compiled[key] = {
          "prefill": jax.jit(lambda p, t, s, q: self._prefill(p, t, s, q, max_new,
                                                             num_samples)),
          "decode": jax.jit(lambda p, st, r, q: self._decode(p, st, r, q, pick),
                            donate_argnums=(1,)),
      }
    return self._compiled[key]

  def _prefill(self, params, tokens, segments, qlambda, max_new, n):
    b, width = tokens.shape
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)  # [B, P]
    cache = transformer_lib.init_cache(self.cfg, b, width + max_new)
    hidden, cache = self.model.apply({"params": params}, tokens, positions, segments,
                                     cache=cache, qlambda=qlambda, return_hidden=True)
    # Only the last position's logits are needed (the head on all P was 10-20% of it).
    logits = transformer_lib.project(self.cfg, params, hidden[:, -1:], qlambda)[:, 0]
    rows = self._split_rows  # Row-indexed arrays split like the prompt rows.
    repeat = lambda x, axis=0: rows(jnp.repeat(x, n, axis=axis), axis)
    batch_axis = 1 if self.cfg.scan_layers else 0  # [L, B, K, S, H] or L x [B, K, S, H]
    cache = {**cache, "segment_ids": repeat(cache["segment_ids"]),
             **jax.tree.map(lambda x: repeat(x, batch_axis),
                            {"k": cache["k"], "v": cache["v"]})}
    r = b * n
    return {
        "cache": cache,
        "logits": repeat(logits),                               # [B*n, V]
        "position": repeat(positions[:, -1] + 1),               # [B*n]
        "out": rows(jnp.full((r, max_new), self.pad_id, jnp.int32)),
        "logprobs": rows(jnp.zeros((r, max_new), jnp.float32)),
        "length": rows(jnp.zeros((r,), jnp.int32)),
        "done": rows(jnp.zeros((r,), bool)),
        "step": jnp.zeros((), jnp.int32),
    }

  def _split_rows(self, x: Array, axis: int = 0) -> Array:
    """``x`` split over ``parallel.sample_sharding``'s devices along ``axis`` (without
    the constraint XLA keeps the constant-initialised loop state whole on each)."""
    if self.parallel is None:
      return x
    sharding = self.parallel.sample_sharding
    spec = jax.sharding.PartitionSpec(*([None] * axis + [sharding.spec[0]]))
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(sharding.mesh, spec))

  def _decode(self, params, state, rng, qlambda, pick: Pick):
    rows, max_new = state["out"].shape
    shape = state["logits"].shape  # [R, V]
    end_ids = jnp.asarray(self.end_ids, jnp.int32)
    noise_at = lambda step: None  # Greedy: no noise.
    if pick.stochastic:
      # Step s samples with jax.random.categorical(fold_in(rng, s), logits): Gumbel noise
      # [R, V] from that key. Drawn for all steps at once when it fits NOISE_BYTES (one
      # vectorised threefry instead of one small rolled loop per step), else per step.
      dtype = state["logits"].dtype
      gumbel = lambda step: jax.random.gumbel(jax.random.fold_in(rng, step), shape,
                                              dtype)  # [R, V]
      noise_at = gumbel
      if max_new * rows * shape[1] * jnp.dtype(dtype).itemsize <= NOISE_BYTES:
        noise = jax.vmap(gumbel)(jnp.arange(max_new))  # [N, R, V]
        noise_at = lambda step: jax.lax.dynamic_index_in_dim(noise, step, keepdims=False)

    def cond(st):
      return (st["step"] < max_new) & ~jnp.all(st["done"])

    def body(st):
      step, logits = st["step"], st["logits"]
      if self.valid_vocab < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < self.valid_vocab, logits, _NEG)
      token = pick.with_noise(logits, noise_at(step)).astype(jnp.int32)  # [R]
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], -1)[:, 0]
      live = ~st["done"]
      token = jnp.where(live, token, self.pad_id)
      done = st["done"] | jnp.isin(token, end_ids)
      logits, cache = self.model.apply(
          {"params": params}, token[:, None], st["position"][:, None],
          jnp.ones_like(token)[:, None], cache=st["cache"], qlambda=qlambda)
      return {
          "cache": cache, "logits": logits[:, -1], "position": st["position"] + 1,
          "out": st["out"].at[:, step].set(token),
          "logprobs": st["logprobs"].at[:, step].set(jnp.where(live, logp, 0.0)),
          "length": st["length"] + live.astype(jnp.int32),
          "done": done, "step": step + 1,
      }

    return jax.lax.while_loop(cond, body, state)
