"""TQ2: packed 2-bit export of ternary kernels, packed inference, runtime adapters.

``pack_params(params, cfg)`` replaces every ``TernaryDense``'s latent ``kernel`` (and
``w_alpha`` / ``w_shift``) with (``docs/ternary_methods.md`` §3)::

    codes          uint8 [..., ceil(K/4), N]  4 codes per byte along K: byte[r, j] bits
                                              2i..2i+1 hold T[r + i·R, j] + 1, R = ceil(K/4);
                                              padding rows hold code 1 (weight 0)
    scale          f32 [] | [N] | [K/G, N]    the multiplier: W = scale · T
    shift          f32 [N] | [K/G, N]         dlt:  W = scale · T + shift
    deadzone_bias  f32 [N]                    tequila: added to the output

and keeps ``bias``, ``norm_scale`` and ``a_alpha`` (plus every float parameter of the
model). Leading axes (``scan_layers``' [L]) are kept. The packed tree runs through the
*same* ``Transformer(cfg)``: ``TernaryDense`` sees ``codes`` and takes the integer path
(int8 activations × int8 codes → int32, then rescaled); qlambda is ignored there (λ=1).
That path unpacks the codes at every call.

TQ2 is the storage and export format. For inference, ``prepare_for_inference(packed,
cfg)`` (or ``load_packed(path, prepare=True)``) converts it once, at load, into the
kernel's form, still 2 bits per weight (``ternary_kernel`` has the layout)::

    codes_u32      uint32 [..., ceil(N/16), ceil(K/16), 16]   16 codes per word along K
    scale_rows     f32 [..., A, 16·ceil(N/16)]                  scale per (group, column)

(``shift``, ``deadzone_bias`` and the rest unchanged). ``TernaryDense`` then runs
``ternary_kernel.matmul``: on CPU a compiled kernel that decodes the codes in registers
inside the matmul; elsewhere XLA on the unpacked int8 codes with the scale on the dot's
output. One decode step of llama-3.2-1b on the prepared tree takes 0.31-0.35× the
float32 model's time at batch 1 and ~0.72× at batch 32 (2 cores of an AMD EPYC under
load, ``docs/ternary_methods.md`` §3.1); the sampler takes the tree like any params.

Files are safetensors (``save_packed`` / ``load_packed``) with the model config and the
per-layer method in the metadata; ``load_model_config`` / ``load_params`` read a run's
config and latent params for the export commands (``experiments/export_packed.py``,
``experiments/export_gguf.py``). ``to_i2s`` / ``to_hf_bitnet`` write one per-tensor
kernel in bitnet.cpp's I2_S layout and Hugging Face's BitNet layout.
"""

import ast
import dataclasses
import functools
import json
import os
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

from fcp_jax.models import ternary
from fcp_jax.models import ternary_kernel
from fcp_jax.models import transformer

FORMAT = "tq2"
VERSION = 1
PACKED_NAMES = ("codes", "scale", "shift", "deadzone_bias")
PREPARED_NAMES = ("codes_u32", "scale_rows", "shift", "deadzone_bias")
unpack_codes = ternary.unpack_codes
Path = Tuple[str, ...]


# ---------------------------------------------------------------------------------------
# Codes.
# ---------------------------------------------------------------------------------------


def pack_codes(codes: Any) -> np.ndarray:
  """int codes [..., K, N] in {-1, 0, 1} -> uint8 [..., ceil(K/4), N]."""
  codes = np.asarray(codes)
  if codes.ndim < 2:
    raise ValueError(f"pack_codes: need codes of rank >= 2, got shape {codes.shape}.")
  bad = ~np.isin(codes, (-1, 0, 1))
  if bad.any():
    raise ValueError(f"pack_codes: codes must be in {{-1, 0, 1}}; found "
                     f"{np.unique(codes[bad])[:5]}.")
  k = codes.shape[-2]
  rows = -(-k // 4)
  pad = [(0, 0)] * codes.ndim
  pad[-2] = (0, 4 * rows - k)
  u = (np.pad(codes.astype(np.int16), pad) + 1).astype(np.uint8)  # [..., 4R, N]
  u = u.reshape(*codes.shape[:-2], 4, rows, codes.shape[-1])  # [..., 4, R, N]
  out = np.zeros((*codes.shape[:-2], rows, codes.shape[-1]), np.uint8)
  for i in range(4):
    out |= u[..., i, :, :] << (2 * i)
  return out


def check_codes(packed: Any, k: int) -> None:
  """Raises if ``packed`` holds the invalid code 3 or non-zero padding."""
  packed = np.asarray(packed)
  fields = np.concatenate([(packed >> (2 * i)) & 3 for i in range(4)], axis=-2)
  if (fields == 3).any():
    raise ValueError("Packed codes hold the invalid code 3.")
  if (fields[..., k:, :] != 1).any():
    raise ValueError(f"Packed codes have non-zero padding rows beyond K={k}.")


def _to_rows(x: np.ndarray, n: int) -> np.ndarray:
  """Compact statistic [..., a, b] -> [...] (a=b=1), [..., N] (a=1) or [..., a, N]."""
  a, b = x.shape[-2:]
  if a == 1 and b == 1:
    return x[..., 0, 0]
  if b != n:
    x = np.repeat(x, n // b, axis=-1)
  return x[..., 0, :] if a == 1 else x


def dequantize_layer(layer: Dict[str, Any], k: int) -> np.ndarray:
  """The float weight [..., K, N] a packed layer stands for (``scale·T (+ shift)``)."""
  codes = unpack_codes(jnp.asarray(layer["codes"]), k)  # [..., K, N]
  n = codes.shape[-1]
  rows = lambda s: s if s.ndim == 2 else jnp.broadcast_to(s, (1, n))  # -> [a, N]

  def one(c, s, sh):
    q = ternary.Quantized(c, rows(s), None if sh is None else rows(sh))
    return ternary.dequantize(q)

  fn = one
  for _ in range(codes.ndim - 2):
    fn = jax.vmap(fn)
  shift = layer.get("shift")
  return np.asarray(fn(codes, jnp.asarray(layer["scale"], jnp.float32),
                       None if shift is None else jnp.asarray(shift, jnp.float32)))


# ---------------------------------------------------------------------------------------
# Whole-model export.
# ---------------------------------------------------------------------------------------


class LayerInfo(NamedTuple):
  """What the export needs to know about one TernaryDense."""
  weight_quant: str
  act_quant: str
  kernel_axes: Tuple[str, str]
  in_features: int  # K
  out_features: int  # N


def ternary_layers(cfg: transformer.TransformerConfig) -> Dict[Path, LayerInfo]:
  """Parameter paths of every ``TernaryDense`` in ``Transformer(cfg)``."""
  return dict(_ternary_layers(cfg))


@functools.lru_cache(maxsize=64)
def _ternary_layers(cfg: transformer.TransformerConfig) -> Dict[Path, LayerInfo]:
  found: Dict[Path, LayerInfo] = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, ternary.TernaryDense) and context.method_name == "__call__":
      found[tuple(m.scope.path)] = LayerInfo(m.weight_quant, m.act_quant, m.kernel_axes,
                                             int(args[0].shape[-1]), m.features)
    return next_fun(*args, **kwargs)

  model = transformer.Transformer(cfg)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return found


def _get(tree: Dict[str, Any], path: Path) -> Any:
  for p in path:
    if p not in tree:
      raise KeyError(f"Parameter path {'/'.join(path)!r} is missing (at {p!r}); "
                     f"keys there: {sorted(tree)}.")
    tree = tree[p]
  return tree


def _plain(tree: Any) -> Any:
  """Unboxed nested dicts of numpy arrays."""
  tree = nn.unbox(tree)
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


def layer_quantizer(info: LayerInfo) -> ternary.WeightQuantizer:
  """The weight quantizer of one TernaryDense (its shard axis set from the kernel axes)."""
  return ternary.weight_quantizer(info.weight_quant, ternary.shard_axis_of(info.kernel_axes))


def quantize_layer(layer: Dict[str, Any], info: LayerInfo) -> ternary.Quantized:
  """One TernaryDense's codes [..., K, N] and compact scales [..., a, b] (+ shift, bias).

  ``layer`` holds the latent ``kernel`` and the quantizer's own params; stacked leading
  axes (``scan_layers``' [L]) are kept. Numpy leaves.
  """
  wq = layer_quantizer(info)
  if "kernel" not in layer:
    raise KeyError(f"Ternary export: no 'kernel' among {sorted(layer)}.")
  kernel = jnp.asarray(layer["kernel"], jnp.float32)
  qnames = list(wq.param_shapes(kernel.shape[-2:]))
  missing = [n for n in qnames if n not in layer]
  if missing:
    raise KeyError(f"Ternary export: {info.weight_quant!r} needs params {missing}; run "
                   "ternary_training.fill_quant_params on a float checkpoint first.")
  q = _quantize_fn(wq, kernel.ndim - 2)(kernel, {n: jnp.asarray(layer[n]) for n in qnames})
  return ternary.Quantized(*(None if x is None else np.asarray(x) for x in q))


def export_layer(layer: Dict[str, Any], info: LayerInfo) -> Dict[str, np.ndarray]:
  """One TernaryDense's latent params -> its packed params (see module docstring)."""
  if isinstance(layer_quantizer(info), ternary.NoWeightQuant):
    return dict(layer)  # Float weights stay float.
  q = quantize_layer(layer, info)
  n = layer["kernel"].shape[-1]
  out = {"codes": pack_codes(np.asarray(q.codes).astype(np.int8)),
         "scale": _to_rows(np.asarray(q.scale, np.float32), n)}
  if q.shift is not None:
    out["shift"] = _to_rows(np.asarray(q.shift, np.float32), n)
  if q.bias is not None:
    out["deadzone_bias"] = np.asarray(q.bias, np.float32)
  for name in ("bias", "norm_scale", "a_alpha"):
    if name in layer:
      out[name] = np.asarray(layer[name])
  return out


@functools.lru_cache(maxsize=None)
def _quantize_fn(wq: ternary.WeightQuantizer, num_lead: int):
  """``wq.quantize`` jitted (and vmapped over ``num_lead`` stacked axes), compiled once."""
  fn = wq.quantize
  for _ in range(num_lead):
    fn = jax.vmap(fn)
  return jax.jit(fn)


def pack_params(params: Any, cfg: transformer.TransformerConfig) -> Dict[str, Any]:
  """The packed tree of a (boxed or plain) latent params tree; numpy leaves."""
  tree = _plain(params)
  for path, info in ternary_layers(cfg).items():
    *parents, name = path
    parent = _get(tree, tuple(parents))
    parent[name] = export_layer(_get(tree, path), info)
  return tree


def prepare_layer(layer: Dict[str, Any], k: int) -> Dict[str, Any]:
  """One packed layer -> its inference form (``codes_u32``, ``scale_rows``); numpy.

  Layers without ``codes`` (float, or already prepared) are returned as they are.
  """
  if "codes" not in layer:
    return dict(layer)
  codes = np.asarray(layer["codes"])  # [..., ceil(K/4), N]
  out = {name: v for name, v in layer.items() if name not in ("codes", "scale")}
  out["codes_u32"] = ternary_kernel.pack_words(np.asarray(unpack_codes(codes, k)))
  out["scale_rows"] = ternary_kernel.scale_rows(layer["scale"], codes.shape[-1],
                                                num_lead=codes.ndim - 2)
  return out


def prepare_for_inference(packed: Any, cfg: transformer.TransformerConfig) -> Dict[str, Any]:
  """The inference form of a packed tree (module docstring): converted once, at load."""
  tree = _plain(packed)
  for path, info in ternary_layers(cfg).items():
    *parents, name = path
    _get(tree, tuple(parents))[name] = prepare_layer(_get(tree, path), info.in_features)
  return tree


# ---------------------------------------------------------------------------------------
# Files and sizes.
# ---------------------------------------------------------------------------------------


def flatten_tree(tree: Dict[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
  """Nested dicts -> ``{"a/b/c": array}``."""
  flat = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if hasattr(v, "items"):
      flat.update(flatten_tree(v, key + "/"))
    else:
      flat[key] = np.array(jax.device_get(v), order="C")  # Keeps 0-d arrays 0-d.
  return flat


def unflatten_tree(flat: Dict[str, Any]) -> Dict[str, Any]:
  """``{"a/b/c": array}`` -> nested dicts."""
  tree: Dict[str, Any] = {}
  for key, v in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def config_to_json(cfg: transformer.TransformerConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> transformer.TransformerConfig:
  fields = json.loads(text)
  return transformer.TransformerConfig(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def save_packed(path: str, packed: Dict[str, Any],
                cfg: transformer.TransformerConfig) -> int:
  """Writes a packed tree as safetensors; returns the file size in bytes."""
  flat = flatten_tree(packed)
  if any(key.endswith("/codes_u32") for key in flat):
    raise ValueError("save_packed writes the TQ2 tree of pack_params; this one is "
                     "prepared for inference (prepare_for_inference), an in-memory form.")
  layers = {"/".join(p): {"method": i.weight_quant, "act": i.act_quant}
            for p, i in ternary_layers(cfg).items()}
  metadata = {"format": FORMAT, "version": str(VERSION), "config": config_to_json(cfg),
              "layers": json.dumps(layers, sort_keys=True)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  st_numpy.save_file(flat, path, metadata=metadata)
  return os.path.getsize(path)


def load_packed(path: str, prepare: bool = False
                ) -> Tuple[Dict[str, Any], transformer.TransformerConfig]:
  """Reads ``save_packed``'s file: (packed tree, model config).

  ``prepare=True`` returns the tree in its inference form (``prepare_for_inference``).
  """
  with safe_open(path, framework="np") as f:
    metadata = f.metadata() or {}
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT} file (format={metadata.get('format')!r}).")
  if int(metadata.get("version", -1)) > VERSION:
    raise ValueError(f"{path}: format version {metadata['version']} is newer than "
                     f"this reader ({VERSION}).")
  tree, cfg = unflatten_tree(st_numpy.load_file(path)), config_from_json(metadata["config"])
  return (prepare_for_inference(tree, cfg) if prepare else tree), cfg


def save_params(params: Any, path: str) -> None:
  """Writes a (boxed or plain) params tree as safetensors with "/"-joined keys."""
  st_numpy.save_file(flatten_tree(nn.unbox(params)), path)


def load_params(workdir: str, cfg: transformer.TransformerConfig,
                params_file: Optional[str] = None) -> Dict[str, Any]:
  """The latent params tree of a run (for the export commands).

  ``params_file`` (.safetensors with "/"-joined keys, or flax .msgpack), else
  ``workdir/params.safetensors``, else the latest orbax checkpoint of ``workdir`` through
  ``fcp_jax.training.checkpoint.restore_params`` (unboxed params of ``cfg``'s shapes).
  """
  path = params_file or os.path.join(workdir, "params.safetensors")
  if os.path.exists(path):
    if path.endswith(".msgpack"):
      with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())
    return unflatten_tree(st_numpy.load_file(path))
  if params_file:
    raise FileNotFoundError(f"--params {params_file!r} does not exist.")
  from fcp_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  model = transformer.Transformer(cfg)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  try:
    return checkpoint.restore_params(workdir, abstract)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"No params at {path!r} and no checkpoint in {workdir!r} "
                            f"({e}); pass --params FILE (.safetensors or .msgpack).") from None


def load_model_config(workdir: str, variant: Optional[str],
                      overrides: Dict[str, Any]) -> transformer.TransformerConfig:
  """TransformerConfig of ``workdir/config.json``'s ``model`` section (``variant`` plus
  field overrides; None keeps the variant's value), else of ``variant``."""
  fields = {}
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      fields = {k: v for k, v in json.load(f).get("model", {}).items() if v is not None}
  variant = fields.pop("variant", None) or variant
  if variant is None:
    raise ValueError(f"No model variant: {path!r} has no model.variant; pass --variant.")
  return transformer.get_variant(variant, **{**fields, **overrides})


def parse_model_overrides(items: Sequence[str]) -> Dict[str, Any]:
  """``["--model.k=v", ...]`` -> ``{k: v}`` (Python literals, else the plain string)."""
  overrides = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not key.startswith("--model.") or not eq:
      raise ValueError(f"Unknown argument {item!r}; model overrides look like --model.k=v.")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A plain string such as absmean.
    overrides[key[len("--model."):]] = value
  return overrides


def tree_nbytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def bits_per_weight(packed: Dict[str, Any], cfg: transformer.TransformerConfig) -> float:
  """Storage of the quantized kernels (codes + scale + shift + dead-zone bias) in bits
  per quantized weight, of a packed or a prepared tree."""
  bits, weights = 0, 0
  for path, info in ternary_layers(cfg).items():
    layer = _get(packed, path)
    names = next((n for n in (PACKED_NAMES, PREPARED_NAMES) if n[0] in layer), None)
    if names is None:
      continue
    bits += 8 * sum(np.asarray(layer[n]).nbytes for n in names if n in layer)
    lead = np.asarray(layer[names[0]]).shape[:-2 if names is PACKED_NAMES else -3]
    weights += int(np.prod(lead)) * info.in_features * info.out_features
  if not weights:
    raise ValueError("bits_per_weight: the tree holds no packed layers.")
  return bits / weights


# ---------------------------------------------------------------------------------------
# Runtime adapters (per-tensor scale only).
# ---------------------------------------------------------------------------------------

I2S_BLOCK = 128  # Weights per I2_S block (x86 layout).


def _per_tensor(layer: Dict[str, Any], k: int, runtime: str) -> Tuple[np.ndarray, float]:
  extra = [n for n in ("shift", "deadzone_bias") if n in layer]
  scale = np.asarray(layer["scale"])
  if scale.ndim != 0 or extra:
    raise ValueError(f"{runtime} takes one per-tensor scale and no shift/bias; this layer "
                     f"has scale shape {scale.shape} and {extra}. Export absmean with "
                     "granularity='tensor'.")
  codes = np.asarray(unpack_codes(jnp.asarray(layer["codes"]), k))
  if codes.ndim != 2:
    raise ValueError(f"{runtime}: export one [K, N] kernel, got codes {codes.shape}.")
  return codes, float(scale)


def to_i2s(layer: Dict[str, Any], k: int) -> np.ndarray:
  """bitnet.cpp I2_S bytes of one packed layer.

  The (N, K) weight is flattened row-major and cut into 128-weight blocks of 32 bytes;
  byte b of a block holds elements b, b+32, b+64, b+96 at bits 7-6, 5-4, 3-2, 1-0 with
  code t+1 (-1→0, 0→1, +1→2). Then the f32 scale (W = s·t) and zeros up to 32 bytes.
  A size not a multiple of 128 is padded with zero weights.
  """
  codes, scale = _per_tensor(layer, k, "I2_S")
  flat = codes.T.reshape(-1)  # (N, K) row-major.
  flat = np.pad(flat, (0, -flat.size % I2S_BLOCK))
  q = (flat + 1).astype(np.uint8).reshape(-1, 4, 32)  # [blocks, group, pos]
  packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]  # [blocks, 32]
  tail = np.zeros(32, np.uint8)
  tail[:4] = np.frombuffer(np.float32(scale).tobytes(), np.uint8)
  return np.concatenate([packed.reshape(-1), tail])


def to_hf_bitnet(layer: Dict[str, Any], k: int) -> Dict[str, np.ndarray]:
  """Hugging Face ``BitLinear`` buffers of one packed layer.

  ``weight``: uint8 [ceil(N/4), K], the (N, K) weight packed along N (row r holds rows
  r, r+R, r+2R, r+3R at bits 0-1 … 6-7, code t+1); ``weight_scale``: f32 [1] holding
  1/s, because HF divides the output by it.
  """
  codes, scale = _per_tensor(layer, k, "HF BitNet")
  return {"weight": pack_codes(codes.T),
          "weight_scale": np.asarray([1.0 / scale], np.float32)}
