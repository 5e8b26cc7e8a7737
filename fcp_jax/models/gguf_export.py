"""GGUF export for llama.cpp: ternary kernels as TQ2_0 / TQ1_0, metadata and tokenizer.

    info = export_gguf("model.gguf", cfg, params, tokenizer, ternary_type="tq2_0")
    print(info.file_bytes, info.bits_per_weight)     # TQ2_0: 2.0625, TQ1_0: 1.6875

Architectures (``ARCHITECTURES``): a Llama without SubLN is llama.cpp's ``llama``
(``qwen2`` with q/k/v biases); BitNet b1.58 with SubLN (SwiGLU, tied embeddings) is its
``bitnet``, whose ``attn_sub_norm`` / ``ffn_sub_norm`` are the input norms of our ternary
o_proj / down_proj. Tensor names are ``gguf_loader``'s import tables read backwards over
``hf.hf_param_plan``; Q/K rows follow the architecture's RoPE layout.

A ternary kernel is written as its dequantized ``s·T`` [N, K] and quantized by
``gguf.quants``: blocks of 256 weights along K, each with an fp16 scale. That holds any
scale that is constant within a block (per tensor, per output channel, or groups of a
multiple of 256 inputs) exactly, up to the scale's fp16 rounding; llama.cpp needs
K % 256 == 0. Embeddings and float kernels are f16 or f32, norms and biases f32.
Features no runtime graph has (extra RMSNorm, DLT's shift, Tequila's bias, learned
activation steps, ...) raise ``ValueError`` saying why. llama.cpp quantizes activations
itself (8-bit per block of 256 for TQ types), so a model trained with per-token int8
activations runs there close to, not bitwise like, JAX. bitnet.cpp's I2_S is not
written: the ``gguf`` package has no type for it.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from flax import traverse_util
import flax.linen as nn
import gguf
import jax
import numpy as np

from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import gguf_loader
from fcp_jax.models import hf
from fcp_jax.models import layers
from fcp_jax.models import packing
from fcp_jax.models import ternary
from fcp_jax.models import transformer as transformer_lib

TransformerConfig = transformer_lib.TransformerConfig
Path = Tuple[str, ...]
QT = gguf.GGMLQuantizationType

BLOCK = gguf.QK_K  # Weights per TQ1_0 / TQ2_0 block, along K.
TERNARY_TYPES = {"tq2_0": QT.TQ2_0, "tq1_0": QT.TQ1_0}
FLOAT_TYPES = {"f16": QT.F16, "f32": QT.F32}
_NUMPY_FLOAT = {QT.F16: np.float16, QT.F32: np.float32}
FILE_TYPES = {QT.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
              QT.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
              QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.F32: gguf.LlamaFileType.ALL_F32}
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'"
                   " + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")

# How each TransformerConfig field reaches the file. A field missing here (a new one)
# is refused unless it keeps its default value.
CONFIG_FIELDS = {
    **{f: "metadata" for f in ("vocab_size", "num_layers", "embed_dim", "num_heads",
                               "num_kv_heads", "head_dim", "mlp_dim", "rope_base",
                               "norm_eps")},
    **{f: "architecture" for f in ("mlp_activation", "rope_scaling", "qkv_bias",
                                   "tie_embeddings", "extra_rmsnorm", "subln")},
    "rope_style": "Q/K row order",
    **{f: "per layer" for f in ("weight_quant", "act_quant", "quant_layers")},
    **{f: "compute only" for f in ("dtype", "param_dtype", "scan_layers", "remat",
                                   "attention", "loss_chunk", "embed_init_std")},
}


# ----------------------------------------------------------------- architectures
Requirement = Tuple[Callable[[TransformerConfig], bool], str]

_SWIGLU: Dict[str, Requirement] = {"mlp_activation": (
    lambda c: c.mlp_activation == "swiglu",
    "llama.cpp's llama, qwen2 and bitnet graphs compute a SiLU-gated MLP (SwiGLU); "
    "GeGLU and ReLU² (BitNet 2B4T) have no mapping there")}
_NO_EXTRA_NORM: Dict[str, Requirement] = {"extra_rmsnorm": (
    lambda c: not c.extra_rmsnorm,
    "an RMSNorm at the input of every quantized linear has no tensor slot in llama.cpp's "
    "graphs (they hold the pre-norms and, for bitnet, the two SubLNs only)")}
_NO_ROPE_SCALING: Dict[str, Requirement] = {"rope_scaling": (
    lambda c: not c.rope_scaling,
    "only the llama architecture reads RoPE scaling (llama3's, from rope_freqs.weight)")}


@dataclasses.dataclass(frozen=True)
class RuntimeArch:
  """One llama.cpp architecture and what a config needs to map onto it."""
  name: str                  # general.architecture
  permuted_qk: bool          # NORM RoPE: Q/K rows in interleaved pairs (as gguf_loader)
  requires: Dict[str, Requirement]
  sub_norms: Dict[str, Path] = dataclasses.field(default_factory=dict)  # kind -> path
  rope_freqs: bool = False   # llama3 RoPE scaling as rope_freqs.weight


ARCHITECTURES = {
    "llama": RuntimeArch("llama", permuted_qk=True, rope_freqs=True,
                         requires={**_SWIGLU, **_NO_EXTRA_NORM}),
    "qwen2": RuntimeArch("qwen2", permuted_qk=False,
                         requires={**_SWIGLU, **_NO_EXTRA_NORM, **_NO_ROPE_SCALING}),
    "bitnet": RuntimeArch(
        "bitnet", permuted_qk=False,
        sub_norms={"attn_sub_norm": ("attn", "o_proj", "norm_scale"),
                   "ffn_sub_norm": ("mlp", "down_proj", "norm_scale")},
        requires={
            **_SWIGLU, **_NO_EXTRA_NORM, **_NO_ROPE_SCALING,
            "tie_embeddings": (lambda c: c.tie_embeddings,
                               "llama.cpp's bitnet graph projects onto token_embd; it "
                               "has no output.weight"),
            "qkv_bias": (lambda c: not c.qkv_bias, "bitnet has no q/k/v biases"),
            "num_heads*head_dim": (lambda c: c.num_heads * c.head_dim == c.embed_dim,
                                   "bitnet's attn_q / attn_output are embed_dim x "
                                   "embed_dim"),
            "quant_layers": (lambda c: c.quantizes("o") and c.quantizes("down"),
                             "SubLN lives in the ternary o_proj / down_proj (their input "
                             "norm); bitnet always applies attn_sub_norm and "
                             "ffn_sub_norm"),
        }),
}
# (subln, qkv_bias) -> architecture.
_ARCH_OF = {(False, False): "llama", (False, True): "qwen2",
            (True, False): "bitnet", (True, True): "bitnet"}


# --------------------------------------------------------------- layers and checks
def _absmax_rule(aq) -> Optional[str]:
  if aq.bits == 8:
    return None
  return (f"bits={aq.bits}: the model was trained on {aq.bits}-bit activations, "
          "llama.cpp feeds 8-bit ones")


# act method -> fn(quantizer) -> None (exportable) or why not.
ACT_RULES = {
    "none": lambda aq: None,
    "absmax_int8": _absmax_rule,
    "elastic": lambda aq: ("a learned LSQ step (a_alpha) clips and rounds the "
                           "activations; llama.cpp quantizes them itself (8-bit absmax "
                           "per block of 256) and has no slot for the step"),
}
# weight method -> why its kernels cannot be a TQ tensor.
WEIGHT_REFUSALS = {
    "dlt": ("DLT's learned shift (W = α·T + γ) adds γ·Σx to every output; TQ1_0/TQ2_0 "
            "hold s·T only and llama.cpp's graphs have no such term"),
    "tequila": ("Tequila's dead-zone bias (added to the output) has no slot next to a "
                "TQ1_0/TQ2_0 kernel in llama.cpp's graphs"),
}


def runtime_arch(cfg: TransformerConfig) -> RuntimeArch:
  """The llama.cpp architecture of ``cfg``; raises ``ValueError`` naming every feature
  that has no runtime mapping, and why."""
  arch = ARCHITECTURES[_ARCH_OF[(cfg.subln, cfg.qkv_bias)]]
  shown = lambda label: (f"{label}={getattr(cfg, label)!r}" if hasattr(cfg, label)
                         else label)
  problems = [f"{shown(label)}: {why}"
              for label, (ok, why) in arch.requires.items() if not ok(cfg)]
  problems += [f"{shown(f.name)}: a config field the GGUF export does not know (add it "
               "to gguf_export.CONFIG_FIELDS)" for f in dataclasses.fields(cfg)
               if f.name not in CONFIG_FIELDS and getattr(cfg, f.name) != f.default]
  where: Dict[str, List[str]] = {}  # Per-layer problem -> the layers that have it.
  for path, info in packing.ternary_layers(cfg).items():
    for p in _layer_problems(info):
      where.setdefault(p, []).append("/".join(path))
  problems += [f"{p} ({paths[0]}" + (f" and {len(paths) - 1} more)" if len(paths) > 1
                                     else ")") for p, paths in where.items()]
  if problems:
    raise ValueError(f"Cannot export this model to GGUF (llama.cpp architecture "
                     f"{arch.name!r}):\n  " + "\n  ".join(problems))
  return arch


def _layer_problems(info: packing.LayerInfo) -> List[str]:
  """Why one TernaryDense cannot be a TQ tensor (empty when it can)."""
  problems = []
  aq = ternary.act_quantizer(info.act_quant)
  why = ACT_RULES.get(aq.method, lambda _: "unknown to the GGUF export")(aq)
  if why:
    problems.append(f"act_quant={info.act_quant!r}: {why}")
  wq = packing.layer_quantizer(info)
  if wq.method in WEIGHT_REFUSALS:
    problems.append(f"weight_quant={info.weight_quant!r}: {WEIGHT_REFUSALS[wq.method]}")
  k = info.in_features
  if k % BLOCK:
    problems.append(f"input dim K={k}: TQ1_0/TQ2_0 store blocks of {BLOCK} weights along "
                    f"K and llama.cpp needs K % {BLOCK} == 0 (make embed_dim, "
                    f"num_heads*head_dim and mlp_dim multiples of {BLOCK})")
    return problems
  a = wq.blocks((k, wq.shards))[0]  # Scale blocks along K (N only needs to split).
  if a > 1 and (k // a) % BLOCK:
    problems.append(
        f"weight_quant={info.weight_quant!r} (granularity={wq.granularity!r}) changes "
        f"its scale every {k // a} inputs; TQ1_0/TQ2_0 hold one fp16 scale per block "
        f"of {BLOCK} inputs of an output row, so the scale may vary per tensor, per "
        f"output channel or per group of a multiple of {BLOCK} inputs only")
  return problems


# -------------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor of the file, before quantization."""
  name: str
  value: np.ndarray   # [out, in] (Hugging Face / GGUF row order) or 1-D
  ternary: bool


def _plain_flat(cfg: TransformerConfig, params: Any) -> Dict[Path, np.ndarray]:
  """Flat numpy params, checked against the shapes ``Transformer(cfg)`` has."""
  tree = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nn.unbox(params))
  flat = traverse_util.flatten_dict(tree)
  want = {p: tuple(x.shape) for p, x in
          traverse_util.flatten_dict(nn.unbox(hf.abstract_params(cfg))).items()}
  have = {p: tuple(x.shape) for p, x in flat.items()}
  if have != want:
    diff = sorted("/".join(p) + f" {have.get(p, 'missing')} vs {want.get(p, 'absent')}"
                  for p in set(have) | set(want) if have.get(p) != want.get(p))
    raise ValueError(f"The params do not match the model config (have vs config): "
                     f"{diff[:6]}{' ...' if len(diff) > 6 else ''}")
  return flat


def _layer_slice(flat: Dict[Path, np.ndarray], path: Path,
                 index: Optional[int]) -> Dict[str, np.ndarray]:
  """The params of the layer at ``path`` (one slice of a stacked layer)."""
  return {p[-1]: v if index is None else v[index]
          for p, v in flat.items() if p[:-1] == path}


def _ternary_weight(layer: Dict[str, np.ndarray], info: packing.LayerInfo) -> np.ndarray:
  """``s·T`` [K, N] f32 of one TernaryDense, computed by the configured quantizer."""
  q = packing.quantize_layer(layer, info)
  if q.shift is not None or q.bias is not None:  # Refused upfront; a safety net.
    raise ValueError(f"weight_quant={info.weight_quant!r} has a shift or bias.")
  k, n = q.codes.shape
  a, b = q.scale.shape
  scale = np.repeat(np.repeat(q.scale.astype(np.float32), k // a, 0), n // b, 1)
  return scale * q.codes.astype(np.float32)


def _rope_factors(cfg: TransformerConfig) -> np.ndarray:
  """llama.cpp's rope_freqs: each frequency is divided by its factor."""
  plain = layers.rope_frequencies(cfg.head_dim, cfg.rope_base)
  scaled = layers.rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
  return np.asarray(plain / scaled, np.float32)


def iter_tensors(cfg: TransformerConfig, params: Any,
                 arch: Optional[RuntimeArch] = None) -> Iterator[GGUFTensor]:
  """Every GGUF tensor of the model, in llama.cpp's names and [out, in] layout.

  Ternary kernels are their dequantized ``s·T`` (f32), yielded one by one.
  """
  arch = arch or runtime_arch(cfg)
  flat = _plain_flat(cfg, params)
  ternary_layers = packing.ternary_layers(cfg)
  used = set()
  plan = hf.hf_param_plan(cfg)
  for hf_name, slot in plan.items():
    layer_path, leaf = slot.path[:-1], slot.path[-1]
    info = ternary_layers.get(layer_path) if leaf == "kernel" else None
    if info is not None:
      layer = _layer_slice(flat, layer_path, slot.layer)
      value = _ternary_weight(layer, info)
      used.update(layer_path + (n,) for n in layer if n != "norm_scale")
    else:
      value = flat[slot.path] if slot.layer is None else flat[slot.path][slot.layer]
      used.add(slot.path)
    value = hf.ours_to_hf(np.asarray(value, np.float32), slot, cfg)  # [out, in]
    if slot.qk_heads and arch.permuted_qk:
      value = hf.permute_qk(value, slot.qk_heads)
    yield GGUFTensor(gguf_loader.gguf_tensor_name(hf_name), value, info is not None)
  for i in range(cfg.num_layers):
    for kind, sub in arch.sub_norms.items():  # bitnet's SubLN gains.
      path, index = ((("layers",) + sub, i) if cfg.scan_layers else
                     ((f"layers_{i}",) + sub, None))
      if path not in flat:
        raise ValueError(f"Architecture {arch.name!r} needs {'/'.join(path)} (its "
                         f"{kind}); the params lack it.")
      used.add(path)
      value = flat[path] if index is None else flat[path][index]
      yield GGUFTensor(f"blk.{i}.{kind}.weight", np.asarray(value, np.float32), False)
  if arch.rope_freqs and cfg.rope_scaling:
    yield GGUFTensor("rope_freqs.weight", _rope_factors(cfg), False)
  left = sorted("/".join(p) for p in set(flat) - used)
  if left:
    raise ValueError(f"Parameters with no GGUF counterpart in {arch.name!r}: {left[:8]}.")


# ------------------------------------------------------------------- tokenizer
@dataclasses.dataclass
class GGUFVocab:
  """``tokenizer.ggml.*`` metadata of one tokenizer."""
  model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
  tokens: List[str]
  types: List[int]
  merges: List[str] = dataclasses.field(default_factory=list)
  pre: Optional[str] = None
  scores: Optional[List[float]] = None
  unk_id: Optional[int] = None


def _char_vocab(tok: tokenizer_lib.CharTokenizer) -> GGUFVocab:
  """A SentencePiece-style vocabulary of single characters (spaces as "▁"), which
  llama.cpp's SPM tokenizer splits one character per token, as ``CharTokenizer``."""
  tokens, types = [], []
  for i in range(tok.vocab_size):
    piece = tok.decode([i])
    if piece in tokenizer_lib.SPECIAL_TOKENS or piece == tok.UNK:
      kind = gguf.TokenType.UNKNOWN if piece == tok.UNK else gguf.TokenType.CONTROL
    elif len(piece.encode("utf-8")) == 1:
      piece, kind = piece.replace(" ", "\u2581"), gguf.TokenType.NORMAL
    else:
      raise ValueError(f"CharTokenizer character {piece!r} (id {i}) is not one byte; "
                       "llama.cpp's SPM tokenizer would split it into byte tokens.")
    tokens.append(piece)
    types.append(int(kind))
  return GGUFVocab("llama", tokens, types, scores=[0.0] * len(tokens),
                   unk_id=tok.unk_id)


def _pre_tokenizer_name(hf_tok) -> str:
  """The ``tokenizer.ggml.pre`` whose rebuilt pre-tokenizer (smollm2's registry) is
  ``hf_tok``'s, read back from the import side."""
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  want = json.loads(hf_tok.to_str())["pre_tokenizer"]
  registry = smollm2.GGUF_PRE_TOKENIZERS
  for name in sorted(registry.names(), key=lambda n: n == "default"):
    probe = Tokenizer(models.BPE())
    probe.pre_tokenizer = registry.lookup(name)()
    if json.loads(probe.to_str())["pre_tokenizer"] == want:
      return name
  raise ValueError(f"The tokenizer's pre-tokenizer matches none llama.cpp knows here "
                   f"({registry.names()}); pass pre=NAME to export_gguf.")


def _hf_vocab(tok: tokenizer_lib.HFTokenizer, pre: Optional[str] = None) -> GGUFVocab:
  """A byte-level BPE (GPT-2 style) ``tokenizer.json`` as llama.cpp's ``gpt2`` model."""
  raw = tok.hf_tokenizer
  data = json.loads(raw.to_str())
  decoder = (data.get("decoder") or {}).get("type")
  if data["model"]["type"] != "BPE" or decoder != "ByteLevel":
    raise ValueError(f"Only byte-level BPE tokenizers export (model "
                     f"{data['model']['type']!r}, decoder {decoder!r}).")
  tokens = [raw.id_to_token(i) for i in range(tok.vocab_size)]
  if None in tokens:
    raise ValueError(f"The tokenizer has no token with id {tokens.index(None)}.")
  added = raw.get_added_tokens_decoder()
  types = [int(gguf.TokenType.NORMAL)] * len(tokens)
  for i, t in added.items():
    types[i] = int(gguf.TokenType.CONTROL if t.special else gguf.TokenType.USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
  return GGUFVocab("gpt2", tokens, types, merges=merges,
                   pre=pre or _pre_tokenizer_name(raw))


# tokenizer class -> fn(tokenizer, pre) -> GGUFVocab.
VOCAB_WRITERS = {
    tokenizer_lib.CharTokenizer: lambda tok, pre: _char_vocab(tok),
    tokenizer_lib.HFTokenizer: _hf_vocab,
}


def tokenizer_vocab(tok, vocab_size: int, pre: Optional[str] = None) -> GGUFVocab:
  """``tok``'s GGUF vocabulary, padded with unused ``[PADi]`` tokens to ``vocab_size``."""
  writer = VOCAB_WRITERS.get(type(tok))
  if writer is None:
    raise TypeError(f"No GGUF vocabulary for {type(tok).__name__}; exportable: "
                    f"{[c.__name__ for c in VOCAB_WRITERS]}.")
  if tok.vocab_size > vocab_size:
    raise ValueError(f"The tokenizer has {tok.vocab_size} tokens, the model "
                     f"{vocab_size} embedding rows.")
  vocab = writer(tok, pre)
  pad = range(len(vocab.tokens), vocab_size)
  vocab.tokens += [f"[PAD{i}]" for i in pad]
  vocab.types += [int(gguf.TokenType.UNUSED)] * len(pad)
  if vocab.scores is not None:
    vocab.scores += [0.0] * len(pad)
  return vocab


def _write_tokenizer(w: gguf.GGUFWriter, tok, vocab: GGUFVocab):
  w.add_tokenizer_model(vocab.model)
  if vocab.pre:
    w.add_tokenizer_pre(vocab.pre)
  w.add_token_list(vocab.tokens)
  w.add_token_types(vocab.types)
  if vocab.merges:
    w.add_token_merges(vocab.merges)
  if vocab.scores is not None:
    w.add_token_scores(vocab.scores)
    w.add_add_space_prefix(False)
  if vocab.unk_id is not None:
    w.add_unk_token_id(vocab.unk_id)
  bos = next((t for t in (tokenizer_lib.ENDOFTEXT, tokenizer_lib.IM_START)
              if t in vocab.tokens), None)
  if bos is not None:  # Never added to prompts, but llama.cpp wants one.
    w.add_bos_token_id(vocab.tokens.index(bos))
  w.add_eos_token_id(tok.im_end_id)  # <|im_end|> ends a response.
  w.add_pad_token_id(tok.pad_id)
  w.add_add_bos_token(False)  # Our prompts carry no BOS.
  w.add_add_eos_token(False)
  w.add_chat_template(CHATML_TEMPLATE)


# ---------------------------------------------------------------------- export
@dataclasses.dataclass(frozen=True)
class GGUFExport:
  """What ``export_gguf`` wrote."""
  path: str
  arch: str
  ternary_type: str
  file_bytes: int
  ternary_tensors: int
  ternary_weights: int
  ternary_bytes: int

  @property
  def bits_per_weight(self) -> float:
    """Storage of the ternary tensors (codes + block scales) per ternary weight."""
    return 8 * self.ternary_bytes / max(self.ternary_weights, 1)


def _lookup(table: Dict[str, Any], key: str, what: str) -> Any:
  if key not in table:
    raise ValueError(f"Unknown {what} {key!r}; options: {sorted(table)}.")
  return table[key]


def _quantize_checked(name: str, value: np.ndarray, qtype: QT) -> np.ndarray:
  """TQ bytes of ``value`` [N, K] = s·T; raises unless they dequantize to it within the
  fp16 rounding of the scale."""
  data = gguf.quants.quantize(value, qtype)
  back = gguf.quants.dequantize(data, qtype).reshape(value.shape)
  if not np.allclose(back, value, rtol=2.0 ** -10, atol=0.0):
    worst = float(np.max(np.abs(back - value)))
    raise ValueError(f"{name}: {qtype.name} does not hold these ternary weights (max "
                     f"error {worst:.3g}); the scale must fit an fp16 (normal range "
                     "6.1e-5 .. 65504).")
  return data


def export_gguf(path: str, cfg: TransformerConfig, params: Any, tokenizer, *,
                ternary_type: str = "tq2_0", float_type: str = "f16",
                context_length: int = 2048, name: Optional[str] = None,
                pre: Optional[str] = None) -> GGUFExport:
  """Writes ``cfg`` / ``params`` (latent, boxed or plain) and ``tokenizer`` as a GGUF.

  ``ternary_type``: "tq2_0" (2.0625 bits/weight) or "tq1_0" (1.6875); ``float_type``:
  "f16" or "f32" for the embedding and float kernels; ``pre`` names the tokenizer's
  llama.cpp pre-tokenizer when it cannot be recognised. Everything is checked before
  the file is opened.
  """
  qtype = _lookup(TERNARY_TYPES, ternary_type, "ternary_type")
  ftype = _lookup(FLOAT_TYPES, float_type, "float_type")
  arch = runtime_arch(cfg)
  vocab = tokenizer_vocab(tokenizer, cfg.vocab_size, pre)
  ternary_layers = packing.ternary_layers(cfg)

  w = gguf.GGUFWriter(path, arch.name)
  w.add_name(name or os.path.splitext(os.path.basename(path))[0])
  w.add_file_type(int(FILE_TYPES[qtype if ternary_layers else ftype]))
  w.add_quantization_version(gguf.GGML_QUANT_VERSION)
  w.add_vocab_size(cfg.vocab_size)
  w.add_context_length(context_length)
  w.add_embedding_length(cfg.embed_dim)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_base)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  _write_tokenizer(w, tokenizer, vocab)

  counts = {"tensors": 0, "weights": 0, "bytes": 0}
  for t in iter_tensors(cfg, params, arch):
    if t.ternary:
      data = _quantize_checked(t.name, t.value, qtype)
      w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=qtype)
      counts["tensors"] += 1
      counts["weights"] += t.value.size
      counts["bytes"] += data.nbytes
    else:
      dtype = _NUMPY_FLOAT[ftype] if t.value.ndim == 2 else np.float32
      w.add_tensor(t.name, t.value.astype(dtype))

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return GGUFExport(path, arch.name, qtype.name, os.path.getsize(path),
                    counts["tensors"], counts["weights"], counts["bytes"])
