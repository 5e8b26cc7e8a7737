"""Tokenizers: one protocol, a character tokenizer and a Hugging Face wrapper.

Both know the special tokens the project relies on:

* ``<|im_start|>`` / ``<|im_end|>``: ChatML turn markers (``<|im_end|>`` ends a response),
* ``<EF>`` / ``</EF>``: the feedback-condition wrapper of FCP,
* a pad token.

Special tokens written literally inside a text are encoded as their single id, so a
formatted ChatML string round-trips through ``encode``/``decode``.
"""

import re
import string
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, runtime_checkable

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EF_OPEN = "<EF>"
EF_CLOSE = "</EF>"
PAD = "<|pad|>"
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, EF_OPEN, EF_CLOSE, ENDOFTEXT)


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of fcp_jax needs from a tokenizer."""

  vocab_size: int
  pad_id: int

  def encode(self, text: str) -> List[int]:
    ...

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    ...

  def token_to_id(self, token: str) -> int:
    ...


class _SpecialMixin:
  """Shared helpers built on ``token_to_id``."""

  @property
  def im_start_id(self) -> int:
    return self.token_to_id(IM_START)

  @property
  def im_end_id(self) -> int:
    return self.token_to_id(IM_END)

  @property
  def ef_open_id(self) -> int:
    return self.token_to_id(EF_OPEN)

  @property
  def ef_close_id(self) -> int:
    return self.token_to_id(EF_CLOSE)

  @property
  def eos_ids(self) -> tuple:
    """Token ids that end a sampled response."""
    ids = [self.im_end_id]
    try:
      ids.append(self.token_to_id(ENDOFTEXT))
    except KeyError:
      pass
    return tuple(sorted(set(ids)))


_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class CharTokenizer(_SpecialMixin):
  """One id per character: specials first, then ``\\n``, ``\\t`` and printable ASCII.

  Characters outside the alphabet map to ``<unk>``. Meant for from-scratch models on
  arithmetic and GSM-style tasks, where it keeps every digit a token of its own.
  """

  UNK = "<unk>"

  def __init__(self, alphabet: Optional[str] = None):
    alphabet = alphabet if alphabet is not None else (
        "\n\t" + "".join(c for c in string.printable if c not in "\n\t\r\x0b\x0c"))
    if len(set(alphabet)) != len(alphabet):
      raise ValueError("CharTokenizer alphabet has duplicate characters.")
    self._id_to_tok = list(SPECIAL_TOKENS) + [self.UNK] + list(alphabet)
    self._tok_to_id: Dict[str, int] = {t: i for i, t in enumerate(self._id_to_tok)}
    self.vocab_size = len(self._id_to_tok)
    self.pad_id = self._tok_to_id[PAD]
    self.unk_id = self._tok_to_id[self.UNK]
    self._num_special = len(SPECIAL_TOKENS) + 1

  def token_to_id(self, token: str) -> int:
    if token not in self._tok_to_id:
      raise KeyError(f"Token {token!r} is not in the CharTokenizer vocabulary.")
    return self._tok_to_id[token]

  def encode(self, text: str) -> List[int]:
    ids = []
    for piece in _SPECIAL_RE.split(text):
      if piece in self._tok_to_id and piece in SPECIAL_TOKENS:
        ids.append(self._tok_to_id[piece])
      else:
        ids.extend(self._tok_to_id.get(c, self.unk_id) for c in piece)
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"Token id {i} outside the vocabulary [0, {self.vocab_size}).")
      if skip_special and i < self._num_special:
        continue
      out.append(self._id_to_tok[i])
    return "".join(out)


class HFTokenizer(_SpecialMixin):
  """Wraps a Hugging Face ``tokenizers.Tokenizer`` (from a JSON file or an object).

  Special tokens the project needs and the file lacks are added at the end of the
  vocabulary (``added_tokens`` reports which), so the model's embedding must be grown
  to ``vocab_size`` (see ``fcp_jax.models.vocab``).
  """

  def __init__(self, tokenizer, pad_token: Optional[str] = None,
               required: Sequence[str] = (IM_START, IM_END, EF_OPEN, EF_CLOSE)):
    from tokenizers import AddedToken, Tokenizer as _HFTok  # pylint: disable=g-import-not-at-top
    if isinstance(tokenizer, str):
      tokenizer = _HFTok.from_file(tokenizer)
    self._tok = tokenizer
    if pad_token is None:
      pad_token = next((t for t in (PAD, ENDOFTEXT, "<pad>")
                        if tokenizer.token_to_id(t) is not None), PAD)
    wanted = list(required) + [pad_token]
    missing = [t for t in dict.fromkeys(wanted) if tokenizer.token_to_id(t) is None]
    if missing:
      tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in missing])
    self.added_tokens = tuple(missing)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.pad_token = pad_token
    self.pad_id = tokenizer.token_to_id(pad_token)

  @property
  def hf_tokenizer(self):
    return self._tok

  def token_to_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise KeyError(f"Token {token!r} is not in the tokenizer vocabulary.")
    return i

  def encode(self, text: str) -> List[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def save(self, path: str):
    self._tok.save(path)
