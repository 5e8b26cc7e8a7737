"""Tests for fcp_jax.data.chat: the FCP template, loss mask and re-templating on ids."""

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fcp_jax.data import chat
from fcp_jax.data.tokenizer import (EF_CLOSE, EF_OPEN, IM_END, IM_START, SPECIAL_TOKENS,
                                    CharTokenizer, HFTokenizer)

Q, C, R = "What is 3+4+5?", "Correct and clear; rigorous.", "3+4=7\n7+5=12\n#### 12"


def _bpe_tokenizer():
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [chat.format_text(Q, C, R), "You are a helpful assistant.", "Correct and clear"]
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus * 20, trainer)
  return HFTokenizer(tok)


TOKENIZERS = {"char": CharTokenizer, "bpe": _bpe_tokenizer}


@pytest.fixture(params=sorted(TOKENIZERS))
def tok(request):
  return TOKENIZERS[request.param]()


def test_exact_published_format():
  text = chat.format_text(Q, C, R)
  assert text == (f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"
                  f"{IM_START}user\n{EF_OPEN}{C}{EF_CLOSE}{Q}{IM_END}\n"
                  f"{IM_START}assistant\n{R}{IM_END}")


@pytest.mark.parametrize("condition", [C, "", None])
def test_ids_match_the_text_template(tok, condition):
  tokens, mask = chat.encode_example(tok, Q, condition, R)
  assert tokens == tok.encode(chat.format_text(Q, condition, R))
  prompt = chat.encode_prompt(tok, Q, condition)
  assert tokens[:len(prompt)] == prompt
  assert tok.decode(prompt).endswith(f"{IM_START}assistant\n")
  assert len(mask) == len(tokens)


@pytest.mark.parametrize("condition", [C, "", None])
def test_loss_mask_covers_exactly_response_and_end(tok, condition):
  tokens, mask = chat.encode_example(tok, Q, condition, R)
  mask = np.asarray(mask)
  prompt = chat.encode_prompt(tok, Q, condition)
  assert not mask[:len(prompt)].any()  # System, condition and question.
  assert mask[len(prompt):].all()
  response_ids = [t for t, m in zip(tokens, mask) if m]
  assert response_ids[-1] == tok.im_end_id
  assert tok.decode(response_ids) == R + IM_END
  # The condition and question tokens are among the unmasked ones.
  content, q_start, q_end = chat.question_span(tok, prompt)
  assert tok.decode(tokens[q_start:q_end]) == Q
  cond_ids = tokens[content:q_start]
  if condition is None:
    assert cond_ids == [] and tok.ef_open_id not in tokens
  else:
    assert cond_ids[0] == tok.ef_open_id and cond_ids[-1] == tok.ef_close_id
    assert tok.decode(cond_ids[1:-1]) == condition
    assert not mask[content:q_start].any()


def test_null_condition_is_adjacent_ef_tokens(tok):
  prompt = chat.encode_prompt(tok, Q, "")
  i = prompt.index(tok.ef_open_id)
  assert prompt[i + 1] == tok.ef_close_id


def test_special_tokens_in_texts_are_rejected(tok):
  with pytest.raises(ValueError, match="question"):
    chat.encode_prompt(tok, f"hi{IM_END}", C)
  with pytest.raises(ValueError, match="condition"):
    chat.encode_prompt(tok, Q, f"good{EF_CLOSE}")
  with pytest.raises(ValueError, match="response"):
    chat.encode_example(tok, Q, C, f"x{IM_START}")


def test_response_ids_end_handling(tok):
  ids = tok.encode(R)
  tokens, mask = chat.encode_example(tok, Q, C, ids + [tok.im_end_id, tok.pad_id, 7])
  assert tokens[-len(ids) - 1:] == ids + [tok.im_end_id]  # Cut after the first EOS.
  tokens, _ = chat.encode_example(tok, Q, C, ids, add_end=False)
  assert tokens[-len(ids):] == ids  # Truncated sample: no end added.


def test_retemplate_swaps_condition_and_keeps_response_ids(tok):
  sampled = tok.encode("3+4=7\n7+5=13\n#### 13") + [tok.im_end_id] + [tok.pad_id] * 3
  prompt = [tok.pad_id] * 4 + chat.encode_prompt(tok, Q, "c plus")  # Left-padded.
  tokens, mask = chat.retemplate(tok, prompt, sampled, "Incorrect and careless.")
  expected_tokens, expected_mask = chat.encode_example(
      tok, Q, "Incorrect and careless.", sampled[:-3])
  assert tokens == expected_tokens and mask == expected_mask
  assert [t for t, m in zip(tokens, mask) if m] == sampled[:-3]
  # To the null condition and to no condition.
  assert chat.retemplate(tok, prompt, sampled, None)[0] == chat.encode_example(
      tok, Q, None, sampled[:-3])[0]
  plain = chat.encode_prompt(tok, Q, None)
  assert chat.retemplate(tok, plain, sampled, "")[0] == chat.encode_example(
      tok, Q, "", sampled[:-3])[0]
  # A truncated sample (no EOS) is kept as is, without an added end.
  cut = sampled[:5]
  tokens, mask = chat.retemplate(tok, prompt, cut, "x")
  assert tokens[-5:] == cut and sum(mask) == 5


def test_retemplate_batch_pads_rows():
  tok = CharTokenizer()
  prompts = [chat.encode_prompt(tok, q, "c+") for q in ("1+1=?", "22+2=?")]
  responses = [tok.encode("#### 2") + [tok.im_end_id], tok.encode("22+2=24\n#### 24")]
  batch = chat.retemplate_batch(tok, prompts, responses, ["Good.", ""])
  assert batch["tokens"].shape == batch["loss_mask"].shape == batch["segment_ids"].shape
  lengths = batch["segment_ids"].sum(1)
  for b in range(2):
    n = lengths[b]
    assert (batch["tokens"][b, n:] == tok.pad_id).all()
    assert (batch["positions"][b, :n] == np.arange(n)).all()
    got = [t for t, m in zip(batch["tokens"][b], batch["loss_mask"][b]) if m]
    assert got == responses[b]
  assert tok.decode(batch["tokens"][1]).count(f"{EF_OPEN}{EF_CLOSE}22+2=?") == 1
  with pytest.raises(ValueError, match="Batch sizes"):
    chat.retemplate_batch(tok, prompts, responses, ["x"])
  small = chat.retemplate_batch(tok, prompts, responses, ["Good.", ""], max_len=10)
  assert small["tokens"].shape == (2, 10) and small["truncated"].tolist() == [1, 1]
