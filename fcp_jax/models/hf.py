"""Hugging Face safetensors checkpoints in and out (Llama / Qwen2 families).

    cfg, params = load_hf("path/to/Qwen2.5-0.5B-Instruct", dtype="bfloat16",
                          scan_layers=True)                     # Llama / Qwen2 families
    save_hf("out/", cfg, params, tokenizer, max_shard_size="2GB")

Layouts. Hugging Face ``nn.Linear`` weights are [out, in]; our kernels are [in, out]
(transposed on the way in and out). HF rotates the two halves of each head
(``rope_style="half"``, our default); with ``rope_style="interleaved"`` the Q/K rows are
permuted the way llama.cpp's converter does, so either style computes the same model.

Returned params are plain arrays (``nn.unbox``-ed), the tree ``model.init`` gives:
``embed/embedding`` [V, D], ``layers_{i}/...`` or, with ``scan_layers=True``, ``layers/...``
with a leading [L] axis, ``final_norm/scale``, ``lm_head/kernel`` [D, V] when untied.
``boxed=True`` wraps them in the same ``nn.Partitioned`` boxes (logical axis names) as
``model.init``. ``shardings`` (a pytree of ``jax.sharding.Sharding`` matching the params,
or one sharding for all) places each parameter on devices as soon as it is complete.

Memory. Loading streams tensors one at a time (``safetensors.safe_open``, GGUF memory
maps): the host holds the output tree being filled plus one tensor, and with
``shardings`` each finished parameter leaves the host at once, so a 7B checkpoint never
needs two full copies. Saving materialises one shard at a time. Single-host only:
``save_hf`` reads every parameter with ``jax.device_get``.

The HF-name -> param-tree plan and the streaming param builder here are shared with
``gguf_loader``, which maps GGUF tensors onto Hugging Face names.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcp_jax import registry
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import transformer as transformer_lib

Array = jax.Array
Path = Tuple[str, ...]
TransformerConfig = transformer_lib.TransformerConfig

HF_CONFIG_READERS = registry.Registry("hf config reader")
HF_CONFIG_WRITERS = registry.Registry("hf config writer")
HF_ROPE_SCALINGS = registry.Registry("hf rope scaling")

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Our activation name <-> Hugging Face ``hidden_act``.
_HF_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


# ---------------------------------------------------------------- name mapping
@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one Hugging Face tensor lives in our params.

  ``layer`` is the index along the stacked [L] axis (``scan_layers``), else None.
  ``transpose``: HF [out, in] weight <-> our [in, out] kernel. ``qk_heads``: head count
  of a Q/K projection (its rows follow the config's ``rope_style``), else 0.
  """
  path: Path
  layer: Optional[int] = None
  transpose: bool = False
  qk_heads: int = 0


# HF name inside ``model.layers.{i}.`` -> (our path inside the layer, transpose, which
# head count permutes it under rope_style="interleaved").
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True, "q"),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True, "k"),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True, ""),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True, ""),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True, ""),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True, ""),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True, ""),
    "input_layernorm.weight": (("attn_norm", "scale"), False, ""),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False, ""),
}
_BIAS_TENSORS = {
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), False, "q"),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), False, "k"),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), False, ""),
}


def hf_param_plan(cfg: TransformerConfig) -> Dict[str, Slot]:
  """Every Hugging Face tensor name of ``cfg``'s model, in HF order, with its ``Slot``."""
  heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "": 0}
  plan = {"model.embed_tokens.weight": Slot(("embed", "embedding"))}
  per_layer = dict(_LAYER_TENSORS, **(_BIAS_TENSORS if cfg.qkv_bias else {}))
  for i in range(cfg.num_layers):
    for hf_suffix, (sub, transpose, head_kind) in per_layer.items():
      if cfg.scan_layers:
        path, layer = ("layers",) + sub, i
      else:
        path, layer = (f"layers_{i}",) + sub, None
      plan[f"model.layers.{i}.{hf_suffix}"] = Slot(path, layer, transpose, heads[head_kind])
  plan["model.norm.weight"] = Slot(("final_norm", "scale"))
  if not cfg.tie_embeddings:
    plan["lm_head.weight"] = Slot(("lm_head", "kernel"), transpose=True)
  return plan


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """HF half-rotation rows -> interleaved pairs (llama.cpp's ``permute``); [out, ...]."""
  return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of ``permute_qk``: interleaved (GGUF) rows -> HF half-rotation rows."""
  return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _hf_to_ours(x: np.ndarray, slot: Slot, cfg: TransformerConfig) -> np.ndarray:
  if slot.qk_heads and cfg.rope_style == "interleaved":
    x = permute_qk(x, slot.qk_heads)
  return x.T if slot.transpose else x


def ours_to_hf(x: np.ndarray, slot: Slot, cfg: TransformerConfig) -> np.ndarray:
  """Our kernel or bias as Hugging Face stores it for ``slot`` (``hf_param_plan``)."""
  x = x.T if slot.transpose else x
  if slot.qk_heads and cfg.rope_style == "interleaved":
    x = unpermute_qk(x, slot.qk_heads)
  return x


# ------------------------------------------------------------- tree utilities
def abstract_params(cfg: TransformerConfig) -> Any:
  """``model.init``'s params as ``ShapeDtypeStruct``s in ``nn.Partitioned`` boxes."""
  model = transformer_lib.Transformer(cfg)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])


def _flatten(tree: Any) -> Dict[Path, Any]:
  out = {}

  def visit(node, prefix):
    if hasattr(node, "items") and not isinstance(node, nn.meta.AxisMetadata):
      for k, v in node.items():
        visit(v, prefix + (str(k),))
    else:
      out[prefix] = node

  visit(tree, ())
  return out


def _unflatten(flat: Dict[Path, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _fmt(path: Path) -> str:
  return "/".join(path)


def _check_paths(cfg: TransformerConfig, have: Iterable[Path], plan: Dict[str, Slot],
                 what: str):
  want = {s.path for s in plan.values()}
  have = set(have)
  extra, missing = sorted(have - want), sorted(want - have)
  if extra or missing:
    raise ValueError(
        f"{what}: parameters do not match the Llama/Qwen2 layout. "
        f"Without a Hugging Face counterpart: {[_fmt(p) for p in extra][:8]}; "
        f"missing: {[_fmt(p) for p in missing][:8]}. (Ternary-only parameters: use "
        f"ternary_training.strip_quant_params / fill_quant_params; extra_rmsnorm="
        f"{cfg.extra_rmsnorm}, subln={cfg.subln} add norms no Llama/Qwen2 model has.)")


def _quant_only(path: Path) -> bool:
  from fcp_jax.models import ternary  # pylint: disable=g-import-not-at-top
  return path[-1] in ternary.QUANT_PARAM_NAMES


class _ParamBuilder:
  """Fills the param tree tensor by tensor (HF names), placing finished leaves.

  Ternary-only parameters of a quantizing config (``w_alpha``, ``a_alpha``, ...) have
  no checkpoint counterpart and are left out: add them with
  ``ternary_training.fill_quant_params``.
  """

  def __init__(self, cfg: TransformerConfig, shardings: Any = None):
    self.cfg = cfg
    self.boxes = {p: b for p, b in _flatten(abstract_params(cfg)).items()
                  if not _quant_only(p)}                    # path -> boxed ShapeDtypeStruct
    self.shapes = {p: nn.unbox(b) for p, b in self.boxes.items()}
    self.plan = hf_param_plan(cfg)
    _check_paths(cfg, self.shapes, self.plan, "Model config")
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
      self.shardings = {p: shardings for p in self.shapes}
    else:
      self.shardings = {p: s for p, s in _flatten(nn.unbox(shardings)).items()
                        if not _quant_only(p)}
      if set(self.shardings) != set(self.shapes):
        raise ValueError("`shardings` must be one Sharding or a tree matching the params; "
                         f"differs at {sorted(set(self.shardings) ^ set(self.shapes))[:5]}.")
    self.buffers: Dict[Path, np.ndarray] = {}
    self.filled: Dict[Path, int] = {}
    self.done: Dict[Path, Array] = {}
    self.seen: Dict[str, str] = {}

  def put(self, name: str, value: np.ndarray, where: str):
    """Converts HF tensor ``name`` (read from ``where``) and stores it."""
    slot = self.plan.get(name)
    if slot is None:
      if name.endswith(_IGNORED_SUFFIXES) or (
          name == "lm_head.weight" and self.cfg.tie_embeddings):
        return
      raise ValueError(f"Unexpected tensor {name!r} in {where} for a model with "
                       f"tie_embeddings={self.cfg.tie_embeddings}, "
                       f"qkv_bias={self.cfg.qkv_bias}, {self.cfg.num_layers} layers.")
    if name in self.seen:
      raise ValueError(f"Tensor {name!r} appears twice: in {self.seen[name]} and {where}.")
    self.seen[name] = where
    spec = self.shapes[slot.path]
    shape = spec.shape[1:] if slot.layer is not None else spec.shape
    hf_shape = tuple(shape[::-1]) if slot.transpose else tuple(shape)
    if tuple(value.shape) != tuple(hf_shape):
      raise ValueError(f"Tensor {name!r} in {where} has shape {tuple(value.shape)}; the "
                       f"config expects {tuple(hf_shape)} (for {_fmt(slot.path)}).")
    value = _hf_to_ours(np.asarray(value), slot, self.cfg).astype(spec.dtype)
    if slot.layer is None:
      self._finish(slot.path, value)
      return
    buf = self.buffers.get(slot.path)
    if buf is None:
      buf = self.buffers[slot.path] = np.empty(spec.shape, spec.dtype)
    buf[slot.layer] = value
    self.filled[slot.path] = self.filled.get(slot.path, 0) + 1
    if self.filled[slot.path] == spec.shape[0]:
      self._finish(slot.path, self.buffers.pop(slot.path))

  def _finish(self, path: Path, value: np.ndarray):
    sharding = self.shardings[path]
    if sharding is None:
      self.done[path] = jnp.asarray(value)
    else:  # Each device (of any process) gets only its own slice.
      self.done[path] = jax.make_array_from_callback(value.shape, sharding,
                                                     lambda index: value[index])

  def result(self, boxed: bool) -> Any:
    missing = [n for n in self.plan if n not in self.seen]
    if missing:
      raise ValueError(f"Checkpoint lacks {len(missing)} tensors the config needs, e.g. "
                       f"{missing[:6]}.")
    if boxed:
      return _unflatten({p: self.boxes[p].replace_boxed(v) for p, v in self.done.items()})
    return _unflatten(self.done)


# ----------------------------------------------------------- Hugging Face config
def _hf_get(hf: Dict[str, Any], key: str, where: str):
  if key not in hf or hf[key] is None:
    raise KeyError(f"{where} has no {key!r}.")
  return hf[key]


@HF_ROPE_SCALINGS.register("default")
def _rope_default(params: Dict[str, Any]) -> Tuple:
  del params
  return ()


@HF_ROPE_SCALINGS.register("llama3")
def _rope_llama3(params: Dict[str, Any]) -> Tuple:
  return ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
          float(params["high_freq_factor"]),
          int(params["original_max_position_embeddings"]))


def _rope_from_hf(hf: Dict[str, Any]) -> Tuple[float, Tuple]:
  """(rope_base, rope_scaling) from transformers 5's ``rope_parameters`` or 4's keys."""
  params = hf.get("rope_parameters")
  if not params:
    params = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  return float(theta), HF_ROPE_SCALINGS.lookup(kind)(params)


def _common_from_hf(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
  get = lambda k: _hf_get(hf, k, where)
  heads, embed = int(get("num_attention_heads")), int(get("hidden_size"))
  act = hf.get("hidden_act", "silu")
  ours = {v: k for k, v in _HF_ACTIVATIONS.items()}
  if act not in ours:
    raise ValueError(f"{where}: hidden_act {act!r} unsupported; options {sorted(ours)}.")
  rope_base, rope_scaling = _rope_from_hf(hf)
  return dict(
      vocab_size=int(get("vocab_size")), num_layers=int(get("num_hidden_layers")),
      embed_dim=embed, num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or embed // heads),
      mlp_dim=int(get("intermediate_size")), mlp_activation=ours[act],
      rope_base=rope_base, rope_scaling=rope_scaling, rope_style="half",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


@HF_CONFIG_READERS.register("llama")
def _llama_from_hf(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"{where}: Llama with {flag}=true is not supported (our model "
                       f"has biases on q/k/v only, as Qwen2).")
  return dict(_common_from_hf(hf, where), qkv_bias=False)


@HF_CONFIG_READERS.register("qwen2")
def _qwen2_from_hf(hf: Dict[str, Any], where: str) -> Dict[str, Any]:
  if hf.get("use_sliding_window"):
    raise ValueError(f"{where}: Qwen2 with use_sliding_window=true is not supported.")
  return dict(_common_from_hf(hf, where), qkv_bias=True)


def config_from_hf(hf: Dict[str, Any], where: str = "config.json") -> TransformerConfig:
  """Our ``TransformerConfig`` from a Hugging Face ``config.json`` dict."""
  model_type = _hf_get(hf, "model_type", where)
  return TransformerConfig(**HF_CONFIG_READERS.lookup(model_type)(hf, where))


def read_hf_config(path: str) -> Dict[str, Any]:
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"No {CONFIG_FILE} in Hugging Face checkpoint {path!r}.")
  with open(file) as f:
    return json.load(f)


def _common_to_hf(cfg: TransformerConfig, max_position_embeddings: int) -> Dict[str, Any]:
  if cfg.mlp_activation not in _HF_ACTIVATIONS:
    raise ValueError(f"mlp_activation {cfg.mlp_activation!r} has no Hugging Face "
                     f"equivalent; exportable: {sorted(_HF_ACTIVATIONS)}.")
  rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_base}
  rope_scaling = None
  if cfg.rope_scaling:
    kind, factor, low, high, orig = cfg.rope_scaling
    rope_scaling = {"rope_type": kind, "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    rope_parameters.update(rope_scaling)
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": _HF_ACTIVATIONS[cfg.mlp_activation],
      "max_position_embeddings": max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": rope_parameters,
      # transformers 4 reads these two instead of rope_parameters.
      "rope_theta": cfg.rope_base, "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02,
      "use_cache": True, "attention_dropout": 0.0,
  }


@HF_CONFIG_WRITERS.register("llama")
def _llama_to_hf(cfg: TransformerConfig, max_position_embeddings: int) -> Dict[str, Any]:
  if cfg.qkv_bias:
    raise ValueError("A config with qkv_bias=True exports as family 'qwen2', not 'llama'.")
  return dict(_common_to_hf(cfg, max_position_embeddings), model_type="llama",
              architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
              pretraining_tp=1)


@HF_CONFIG_WRITERS.register("qwen2")
def _qwen2_to_hf(cfg: TransformerConfig, max_position_embeddings: int) -> Dict[str, Any]:
  if not cfg.qkv_bias:
    raise ValueError("Family 'qwen2' needs qkv_bias=True; export as 'llama'.")
  return dict(_common_to_hf(cfg, max_position_embeddings), model_type="qwen2",
              architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
              sliding_window=None, max_window_layers=cfg.num_layers)


# --------------------------------------------------------------- HF import
def hf_weight_files(path: str) -> List[str]:
  """The safetensors files of a checkpoint: the index's shards, or the single file."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise FileNotFoundError(f"{index} names shards that do not exist: {absent}.")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(
        f"No *.safetensors in {path!r} (only safetensors checkpoints are supported; "
        f"convert pytorch_model.bin with transformers' save_pretrained first).")
  return [os.path.join(path, f) for f in found]


def iter_safetensors(files: Sequence[str]) -> Iterator[Tuple[str, np.ndarray, str]]:
  """Yields ``(name, array, file)`` one tensor at a time (memory-mapped reads)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  for file in files:
    with safe_open(file, framework="numpy") as f:
      for name in f.keys():
        yield name, f.get_tensor(name), file


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def load_hf(path: str, *, dtype: Any = "float32", scan_layers: bool = False,
            boxed: bool = False, shardings: Any = None,
            **cfg_overrides) -> Tuple[TransformerConfig, Any]:
  """Reads a Llama / Qwen2 checkpoint directory into ``(cfg, params)``.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or shards + index.
    dtype: dtype of the returned params and of computation (``cfg.param_dtype`` and
      ``cfg.dtype``; override either through ``cfg_overrides``).
    scan_layers: stack the layers under ``layers/`` with a leading [L] axis.
    boxed: wrap leaves in ``nn.Partitioned`` boxes like ``model.init``.
    shardings: one ``Sharding`` or a tree of them (matching the params) to place each
      finished parameter on devices.
    **cfg_overrides: further ``TransformerConfig`` fields (e.g. ``remat``,
      ``weight_quant``, ``rope_style="interleaved"``). A quantizing config gets the
      float weights as its latent kernels; its ternary-only parameters (``w_alpha``,
      ...) are absent: add them with ``ternary_training.fill_quant_params``.
  """
  where = os.path.join(path, CONFIG_FILE)
  cfg = config_from_hf(read_hf_config(path), where)
  name = _dtype_name(dtype)
  cfg = cfg.replace(dtype=name, param_dtype=name, scan_layers=scan_layers)
  cfg = cfg.replace(**cfg_overrides)
  builder = _ParamBuilder(cfg, shardings)
  for tensor_name, value, file in iter_safetensors(hf_weight_files(path)):
    builder.put(tensor_name, value, file)
  return cfg, builder.result(boxed)


# --------------------------------------------------------------- HF export
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: Union[int, str]) -> int:
  """Bytes from an int or a string like ``"5GB"``, ``"500MiB"``, ``"64KB"``."""
  if isinstance(size, (int, np.integer)):
    if size <= 0:
      raise ValueError(f"Shard size must be positive, got {size}.")
    return int(size)
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _SIZE_UNITS:
    raise ValueError(f"Cannot parse size {size!r}; use e.g. 5GB, 500MB, 64KiB or bytes.")
  return parse_size(int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))


def _tokenizer_files(path: str, tokenizer) -> Dict[str, Any]:
  """Writes tokenizer.json + tokenizer_config.json; returns config.json token ids."""
  if not hasattr(tokenizer, "hf_tokenizer"):
    raise TypeError(f"save_hf can write only an HFTokenizer, got "
                    f"{type(tokenizer).__name__}.")
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  eos = tokenizer_lib.IM_END
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
               "pad_token": tokenizer.pad_token, "bos_token": None,
               "clean_up_tokenization_spaces": False}, f, indent=2)
  return {"eos_token_id": tokenizer.im_end_id, "pad_token_id": tokenizer.pad_id,
          "bos_token_id": None}


def save_hf(path: str, cfg: TransformerConfig, params: Any, tokenizer=None, *,
            max_shard_size: Union[int, str] = "2GB", dtype: Any = None,
            family: Optional[str] = None,
            max_position_embeddings: int = 32_768) -> List[str]:
  """Writes a checkpoint ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

  ``config.json`` (``family`` "llama", or "qwen2" when ``cfg.qkv_bias``), weights in
  shards of at most ``max_shard_size`` bytes (``model.safetensors`` when one shard
  suffices, else ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``),
  and with an ``HFTokenizer`` its ``tokenizer.json``. Weight files a previous save left
  in ``path`` are removed first. ``dtype`` (default: the params' own) is the stored dtype.
  Params may be boxed or plain, per-layer or stacked. Returns the weight file paths.
  """
  if cfg.weight_quant != "none" or cfg.act_quant != "none":
    raise ValueError("save_hf exports float models. For the latent weights of a ternary "
                     "model pass ternary_training.strip_quant_params(params) and "
                     "cfg.replace(weight_quant='none', act_quant='none').")
  family = family or ("qwen2" if cfg.qkv_bias else "llama")
  plan = hf_param_plan(cfg)
  flat = _flatten(nn.unbox(params))
  _check_paths(cfg, flat, plan, "save_hf")
  limit = parse_size(max_shard_size)

  # Plan shards from shapes alone.
  specs = {}
  for name, slot in plan.items():
    leaf = flat[slot.path]
    shape = leaf.shape[1:] if slot.layer is not None else leaf.shape
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else leaf.dtype))
    specs[name] = (shape, out_dtype)
  shards: List[List[str]] = [[]]
  size = 0
  for name, (shape, out_dtype) in specs.items():
    nbytes = int(np.prod(shape)) * out_dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes

  os.makedirs(path, exist_ok=True)
  for old in os.listdir(path):
    if old in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(old):
      os.remove(os.path.join(path, old))
  hf = HF_CONFIG_WRITERS.lookup(family)(cfg, max_position_embeddings)
  stored = {np.dtype(d).name for _, d in specs.values()}
  hf["dtype"] = hf["torch_dtype"] = stored.pop() if len(stored) == 1 else "float32"
  if tokenizer is not None:
    hf.update(_tokenizer_files(path, tokenizer))
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2)

  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            for k in range(len(shards))])
  weight_map, total = {}, 0
  for file, members in zip(names, shards):
    tensors = {}
    for name in members:
      slot = plan[name]
      leaf = flat[slot.path]
      value = leaf[slot.layer] if slot.layer is not None else leaf
      value = ours_to_hf(np.asarray(jax.device_get(value)), slot, cfg)
      tensors[name] = np.ascontiguousarray(value.astype(specs[name][1]))
      weight_map[name] = file
      total += tensors[name].nbytes
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    del tensors
  if len(shards) > 1:
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                indent=2)
  return [os.path.join(path, n) for n in names]

