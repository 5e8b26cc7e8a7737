"""The FCP sequence format: ChatML with the feedback condition ``<EF>c</EF>``, on token ids.

One training sequence (``docs/fcp_method.md`` §1.2)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<EF>{c}</EF>{question}<|im_end|>\\n
    <|im_start|>assistant\\n{response}<|im_end|>

(shown on three lines; there is no newline other than the ``\\n`` written). The
condition comes in three forms:

* ``condition="..."``: ``<EF>...</EF>`` before the question, no separator;
* ``condition=""``: the null condition ``<EF></EF>``;
* ``condition=None``: no wrapper at all, the plain SFT prompt.

Everything is built by concatenating the token ids of separately encoded pieces, never
by string surgery, so the question and the condition stay separate fields end to end
and the response ids are kept exactly (``retemplate``). Texts must not contain the
special tokens themselves (``<|im_end|>``, ``<EF>``, ...): that raises ``ValueError``.

Loss mask: 1 exactly on the response tokens and the closing ``<|im_end|>``; 0 on the
system turn, the condition and the question. ``mask[t] = 1`` means token ``t`` is a
target, predicted from the tokens before it.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fcp_jax.data.tokenizer import EF_CLOSE, EF_OPEN, IM_END, IM_START, SPECIAL_TOKENS

DEFAULT_SYSTEM = "You are a helpful assistant."

Response = Union[str, Sequence[int]]


def _check_plain(text: str, what: str) -> str:
  if not isinstance(text, str):
    raise TypeError(f"The {what} must be a string, got {type(text).__name__}.")
  for special in SPECIAL_TOKENS:
    if special in text:
      raise ValueError(f"The {what} contains the special token {special!r}: {text[:80]!r}")
  return text


def _header(tok, system: Optional[str]) -> List[int]:
  system_turn = "" if system is None else (
      f"{IM_START}system\n{_check_plain(system, 'system prompt')}{IM_END}\n")
  return tok.encode(f"{system_turn}{IM_START}user\n")


def _footer(tok) -> List[int]:
  return tok.encode(f"{IM_END}\n{IM_START}assistant\n")


def encode_condition(tok, condition: Optional[str]) -> List[int]:
  """``<EF>c</EF>`` as ids; ``""`` gives ``<EF></EF>``; None gives nothing."""
  if condition is None:
    return []
  return [tok.ef_open_id] + tok.encode(_check_plain(condition, "condition")) + [
      tok.ef_close_id]


def encode_prompt(tok, question: str, condition: Optional[str] = None, *,
                  system: Optional[str] = DEFAULT_SYSTEM) -> List[int]:
  """Prompt ids, ending right after ``<|im_start|>assistant\\n``."""
  return (_header(tok, system) + encode_condition(tok, condition)
          + tok.encode(_check_plain(question, "question")) + _footer(tok))


def trim_response(tok, response_ids: Sequence[int]) -> List[int]:
  """Response ids up to and including the first EOS; trailing pads dropped if none."""
  ids = [int(i) for i in response_ids]
  eos = set(tok.eos_ids)
  for i, t in enumerate(ids):
    if t in eos:
      return ids[:i + 1]
  while ids and ids[-1] == tok.pad_id:
    ids.pop()
  return ids


def encode_response(tok, response: Response, *, add_end: bool = True) -> List[int]:
  """Response ids: text is encoded, ids are trimmed (``trim_response``).

  With ``add_end`` a ``<|im_end|>`` is appended unless the ids already end in an EOS.
  """
  if isinstance(response, str):
    ids = tok.encode(_check_plain(response, "response"))
  else:
    ids = trim_response(tok, response)
  if add_end and (not ids or ids[-1] not in tok.eos_ids):
    ids.append(tok.im_end_id)
  return ids


def encode_example(tok, question: str, condition: Optional[str], response: Response, *,
                   system: Optional[str] = DEFAULT_SYSTEM,
                   add_end: bool = True) -> Tuple[List[int], List[int]]:
  """Returns ``(tokens, loss_mask)`` of one full sequence (see the module docstring)."""
  prompt = encode_prompt(tok, question, condition, system=system)
  answer = encode_response(tok, response, add_end=add_end)
  return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def format_text(question: str, condition: Optional[str], response: Optional[str] = None,
                *, system: Optional[str] = DEFAULT_SYSTEM) -> str:
  """The same sequence as text (for logs and inspection; training uses the ids)."""
  system_turn = "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"
  cond = "" if condition is None else f"{EF_OPEN}{condition}{EF_CLOSE}"
  text = f"{system_turn}{IM_START}user\n{cond}{question}{IM_END}\n{IM_START}assistant\n"
  return text if response is None else f"{text}{response}{IM_END}"


def question_span(tok, prompt_ids: Sequence[int]) -> Tuple[int, int, int]:
  """Locates the user content of a prompt built by ``encode_prompt``.

  Returns ``(content_start, question_start, question_end)``: the condition (if any)
  is ``prompt_ids[content_start:question_start]`` and the question
  ``prompt_ids[question_start:question_end]``.
  """
  ids = [int(i) for i in prompt_ids]
  user = tok.encode(f"{IM_START}user\n")
  starts = [i for i in range(len(ids) - len(user) + 1) if ids[i:i + len(user)] == user]
  if not starts:
    raise ValueError("Prompt has no user turn (<|im_start|>user\\n).")
  content = starts[-1] + len(user)
  question = content
  if content < len(ids) and ids[content] == tok.ef_open_id:
    try:
      question = ids.index(tok.ef_close_id, content) + 1
    except ValueError:
      raise ValueError("Prompt opens <EF> but never closes it.") from None
  try:
    end = ids.index(tok.im_end_id, question)
  except ValueError:
    raise ValueError("Prompt's user turn never ends (<|im_end|>).") from None
  return content, question, end


def retemplate(tok, prompt_ids: Sequence[int], response_ids: Sequence[int],
               condition: Optional[str]) -> Tuple[List[int], List[int]]:
  """Swaps the condition of a sampled prompt, keeping every other id identical.

  For online bootstrapping: the response was sampled under ``<EF>c+</EF>`` and is
  trained under the fresh feedback ``c'``. Left padding of the prompt is dropped.
  Response ids are cut after their first EOS (trailing padding dropped); a response
  without EOS (truncated) gets none added.
  """
  prompt = [int(i) for i in prompt_ids]
  while prompt and prompt[0] == tok.pad_id:
    prompt.pop(0)
  content, question, _ = question_span(tok, prompt)
  new_prompt = prompt[:content] + encode_condition(tok, condition) + prompt[question:]
  response = trim_response(tok, response_ids)
  return new_prompt + response, [0] * len(new_prompt) + [1] * len(response)


def pad_rows(rows: Sequence[Tuple[Sequence[int], Sequence[int]]], pad_id: int,
             max_len: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Right-pads ``(tokens, loss_mask)`` rows into one batch of arrays.

  Rows longer than ``max_len`` are truncated at the end. Returns ``tokens``,
  ``positions``, ``segment_ids`` (1 on tokens, 0 on padding), ``loss_mask`` and
  ``truncated`` (per row, 1 where tokens were cut).
  """
  lengths = [len(t) for t, _ in rows]
  width = max_len if max_len is not None else max(lengths, default=1)
  b = len(rows)
  tokens = np.full((b, width), pad_id, np.int32)  # [B, T]
  mask = np.zeros((b, width), np.float32)  # [B, T]
  segment_ids = np.zeros((b, width), np.int32)  # [B, T]
  positions = np.zeros((b, width), np.int32)  # [B, T]
  for i, (t, m) in enumerate(rows):
    n = min(len(t), width)
    tokens[i, :n] = t[:n]
    mask[i, :n] = m[:n]
    segment_ids[i, :n] = 1
    positions[i, :n] = np.arange(n)
  truncated = np.array([n > width for n in lengths], np.int32)  # [B]
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids,
              loss_mask=mask, truncated=truncated)


def retemplate_batch(tok, prompts: Sequence[Sequence[int]],
                     responses: Sequence[Sequence[int]],
                     conditions: Sequence[Optional[str]],
                     max_len: Optional[int] = None) -> Dict[str, np.ndarray]:
  """``retemplate`` over a batch, padded by ``pad_rows`` (arrays ``[B, T]``)."""
  if not len(prompts) == len(responses) == len(conditions):
    raise ValueError(f"Batch sizes differ: {len(prompts)} prompts, {len(responses)} "
                     f"responses, {len(conditions)} conditions.")
  rows = [retemplate(tok, p, r, c) for p, r, c in zip(prompts, responses, conditions)]
  return pad_rows(rows, tok.pad_id, max_len)
