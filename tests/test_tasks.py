"""Tests for fcp_jax.data.tasks: task sources, splits, reference steps, answer checking."""

import json
import os
import re

import pytest

from fcp_jax.data import answers
from fcp_jax.data import jsonl
from fcp_jax.data import tasks
from fcp_jax.data.answers import Step
from fcp_jax.data.tasks import TASKS, Example

CHAIN = "chain_sum(min_terms=2, max_terms=3, min_digits=1, max_digits=1)"
STEP_LINE = re.compile(r"^-?[\d.]+(?:[-+*/]\(?-?[\d.]+\)?)+=-?[\d.]+$")


def test_builders_are_deterministic_and_seeded():
  a = TASKS.build(CHAIN, split="train", size=30, seed=3)
  b = TASKS.build(CHAIN, split="train", size=30, seed=3)
  c = TASKS.build(CHAIN, split="train", size=30, seed=4)
  assert a == b
  assert [e.uid for e in a] != [e.uid for e in c]
  assert len({e.uid for e in a}) == 30  # Unique within a split.


@pytest.mark.parametrize("spec", [CHAIN, "basic_arithmetic(max_terms=3, max_digits=2)",
                                  "products(max_digits=2)", "leg_counting(max_animals=3)"])
def test_train_and_eval_are_disjoint_and_references_check_out(spec):
  train = TASKS.build(spec, split="train", size=60, seed=0)
  evals = TASKS.build(spec, split="eval", size=15, seed=0)
  assert not {e.question for e in train} & {e.question for e in evals}
  for e in train + evals:
    assert e.task == spec.split("(")[0] and e.answer is not None and e.steps
    ref = tasks.reference_response(e)
    lines = ref.split("\n")
    assert lines[-1] == f"#### {e.answer}"
    assert all(STEP_LINE.match(line) for line in lines[:-1]), ref
    assert answers.check_answer(e, ref)
    assert all(c.ok for c in answers.find_claims(ref))


def test_gsm_symbolic_splits_by_template():
  train = TASKS.build("gsm_symbolic", split="train", size=40, seed=0)
  evals = TASKS.build("gsm_symbolic", split="eval", size=10, seed=0)
  train_templates = {e.metadata["template"] for e in train}
  eval_templates = {e.metadata["template"] for e in evals}
  assert train_templates and eval_templates and not train_templates & eval_templates
  for e in train + evals:
    assert e.reference and answers.check_answer(e, tasks.reference_response(e))


def test_compact_questions_fit_a_char_budget():
  examples = TASKS.build(CHAIN.replace(")", ", compact=True)"), split="train", size=50,
                         seed=0)
  for e in examples:
    assert re.fullmatch(r"[\d+\-]+=\?", e.question), e.question
    assert len(e.question) + len(tasks.reference_response(e)) <= 40


def test_exact_steps_of_an_expression():
  value, steps = answers.evaluate("(2 + 3) * 4 - -6 / 3")
  assert value == 22
  assert [s.text for s in steps] == ["2+3=5", "5*4=20", "-6/3=-2", "20-(-2)=22"]
  ex = Example(uid="u", question="q", answer="22", steps=steps)
  assert tasks.reference_response(ex) == "2+3=5\n5*4=20\n-6/3=-2\n20-(-2)=22\n#### 22"
  assert tasks.reference_response(ex, direct=True) == "#### 22"
  assert answers.check_answer(ex, tasks.reference_response(ex, direct=True))


def test_wrong_response_ends_off_by_delta():
  _, steps = answers.evaluate("4-9+7")
  ex = Example(uid="u", question="4-9+7=?", answer="2", steps=steps)
  assert tasks.wrong_response(ex, 1) == "4-9=-5\n-5+7=3\n#### 3"
  assert tasks.wrong_response(ex, -2, direct=True) == "#### 0"
  assert not answers.check_answer(ex, tasks.wrong_response(ex, 1))
  # The slip is the last claim: every earlier claim still checks out.
  claims = answers.find_claims(tasks.wrong_response(ex, 1))
  assert [c.ok for c in claims] == [True, False]
  with pytest.raises(ValueError, match="nonzero"):
    tasks.wrong_response(ex, 0)
  with pytest.raises(ValueError, match="not a number"):
    tasks.wrong_response(Example(uid="v", question="q", answer="blue"), 1)


def test_unknown_task_and_bad_knobs():
  with pytest.raises(KeyError, match="chain_sum"):
    TASKS.build("chain_summ", split="train", size=1)
  with pytest.raises(ValueError, match="Bad knobs"):
    TASKS.build("chain_sum(no_such_knob=1)", split="train", size=1)
  with pytest.raises(ValueError, match="split"):
    TASKS.build(CHAIN, split="validation", size=1)


def test_too_small_problem_space_raises():
  spec = "products(min_terms=2, max_terms=2, min_digits=1, max_digits=1)"
  with pytest.raises(ValueError, match="too small"):
    TASKS.build(spec, split="eval", size=60, seed=0, max_chunks=2)
  repeated = TASKS.build(spec, split="eval", size=60, seed=0, unique=False)
  assert len({e.uid for e in repeated}) == 60  # Repeats get "#k" suffixes.


def test_gsm8k_from_shared_dir_has_annotated_steps():
  train = TASKS.build("gsm8k", split="train")
  assert len(train) == 7473
  first = train[0]
  assert first.uid == "gsm8k-train-0" and first.answer == "72"
  assert first.steps == (Step("48/2", "24"), Step("48+24", "72"))
  assert tasks.reference_response(first) == "48/2=24\n48+24=72\n#### 72"
  subset = TASKS.build("gsm8k", split="eval", size=5, seed=1)
  assert subset == TASKS.build("gsm8k", split="eval", size=5, seed=1)
  assert all(e.uid.startswith("gsm8k-test-") for e in subset)


def _gsm_dir(tmp_path, lines):
  os.makedirs(tmp_path / "gsm8k")
  with open(tmp_path / "gsm8k" / "train.jsonl", "w") as f:
    f.write("\n".join(lines) + "\n")
  return str(tmp_path)


def test_gsm8k_data_dir_env_knob_and_bad_line(tmp_path, monkeypatch):
  row = {"question": "Q?", "answer": "So 2*3=<<2*3=6>>6 and 1,000+6=<<1000+6=1006>>1,006\n"
                                     "#### 1,006"}
  root = _gsm_dir(tmp_path, [json.dumps(row), '{"question": 1}'])
  monkeypatch.setenv(tasks.DATA_DIR_ENV, root)
  with pytest.raises(jsonl.JsonlError, match=r"train\.jsonl:2: "):
    TASKS.build("gsm8k", split="train")
  monkeypatch.delenv(tasks.DATA_DIR_ENV)
  (e,) = TASKS.build("gsm8k(on_error='skip')", split="train", data_dir=root)
  assert e.answer == "1006" and [s.text for s in e.steps] == ["2*3=6", "1000+6=1006"]


def test_user_jsonl_task(tmp_path):
  path = tmp_path / "mine.jsonl"
  rows = [{"prompt": f"What is {i}+{i}?", "answer": 2 * i} for i in range(40)]
  rows.append({"question": "Open question", "id": "open-1"})
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  everything = TASKS.build(f"jsonl(path={str(path)!r})", split="train")
  assert len(everything) == 41 and everything[-1].uid == "open-1"
  assert everything[-1].answer is None and everything[0].answer == "0"
  spec = f"jsonl(path={str(path)!r}, eval_fraction=0.3)"
  train, evals = (TASKS.build(spec, split=s) for s in ("train", "eval"))
  assert len(train) + len(evals) == 41 and evals
  assert not {e.uid for e in train} & {e.uid for e in evals}


@pytest.mark.parametrize("text,answer,how", [
    ("3+4=7\n#### 7", "7", "marker"),
    ("so #### $1,250.50 dollars", "1250.50", "marker"),
    ("thus \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
    ("The answer is: -12.", "-12", "answer_is"),
    ("we get 5 and then 8", "8", "last_number"),
    ("3-7=-4", "-4", "last_number"),
    ("no digits here", None, None),
])
def test_find_final_answer(text, answer, how):
  assert answers.find_final_answer(text) == (answer, how)


def test_check_answer_numeric_and_math_verify():
  ex = Example(uid="u", question="q", answer="0.5")
  assert answers.check_answer(ex, "#### 0.50")
  assert answers.check_answer(ex, "#### 1/2")
  assert not answers.check_answer(ex, "#### 0.6")
  assert not answers.check_answer(ex, "I don't know")
  assert answers.check_answer(ex, "so \\boxed{\\frac{1}{2}}")  # Via math-verify.
  with pytest.raises(ValueError, match="no reference answer"):
    answers.check_answer(Example(uid="v", question="q"), "#### 1")


def test_find_claims():
  text = ("Natalia sold 48/2 = <<48/2=24>>24 clips.\nThen 0.2 x 50 = $10. 1,000+1=1,001\n"
          "Also (2*3)+1=8 and 10/3 = 3.33 and 5/0=3.\n3-7=-4")
  claims = [(c.text, c.ok, c.line) for c in answers.find_claims(text)]
  assert claims == [("48/2=24", True, 1), ("0.2*50=10", True, 2), ("1000+1=1001", True, 2),
                    ("(2*3)+1=8", False, 3), ("10/3=3.33", True, 3), ("5/0=3", False, 3),
                    ("3-7=-4", True, 4)]
  assert answers.find_claims("a = 3 + 4 = 7")[0].text == "3+4=7"
  assert answers.find_claims("x = 12 and 30% = 4") == []


def test_format_question_styles():
  ex = Example(uid="u", question="2+2=?")
  assert tasks.format_question(ex, "none") == "2+2=?"
  assert tasks.format_question(ex).startswith("2+2=?\n") and "####" in tasks.format_question(ex)
  with pytest.raises(KeyError):
    tasks.format_question(ex, "fancy")


def test_example_dict_roundtrip():
  ex = TASKS.build(CHAIN, split="train", size=1, seed=0)[0]
  assert Example.from_dict(json.loads(json.dumps(ex.to_dict()))).steps == ex.steps
