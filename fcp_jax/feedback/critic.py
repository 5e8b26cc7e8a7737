"""Rule-based critic: verbal feedback from the task's reference steps, no language model.

For each (example, response) the critic

1. re-evaluates every ``a op b = c`` claim of the response (``+ - * / x × ÷``, integers
   and decimals, parentheses; see ``answers.find_claims``) and finds the first wrong one;
2. finds the first reference intermediate value (``example.steps``) that no number of
   the response reaches;
3. checks the final answer (``answers.check_answer``), the final-answer marker
   ``#### <answer>``, and the length against the reference (the longer of the compact
   reference response and the reference solution text): verbose above
   ``max(verbose_ratio * reference, reference + verbose_slack)`` characters;

then writes the three published styles (``docs/fcp_method.md`` §2): ``user`` (sentiment
only: no digit, no symbol, no word of the task), ``reviewer`` (adjectives and adverbs,
never where the error is) and ``critique`` (names the first wrong step or the first
missing value). Wording is drawn from phrase banks composed part by part with a seed
derived from ``(env seed, example uid, response)``: the same query always gets the same
feedback, different queries get varied paraphrases.

Scores: correct and clean 10; correct with issues (a slip along the way, a skipped
step, no marker, too verbose) 7, 6 or 5 for one, two, three or more issues; wrong 1-4
(one point each for a marker, all claims right, reaching at least half the reference
values); no answer at all 0.

``noise`` is the rate at which the critic turns into an imperfect judge (seeded per
query): half of the noisy answers flip the verdict of the texts and the score, half blur
them into vague, neutral feedback scored 5. ``correct`` always stays the true verdict.

``critique_numbers=False`` writes every number of the critique as ``N``: free text that
still names what went wrong, but leaks no answer or intermediate value (a pool c+ drawn
from another question would otherwise carry that question's answer).
"""

import dataclasses
import itertools
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

from fcp_jax.data import answers
from fcp_jax.data import tasks
from fcp_jax.feedback.base import FEEDBACK_ENVS, Feedback, QueryLike, as_queries

VERSION = 1
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # A number of a critique (critique_numbers).

# ---------------------------------------------------------------------------------------
# Phrase banks. Reviewer summaries are "{A} {joiner} {b}; {c} {d}." with one entry of
# each list; users get "{opener} {follow-up}"; critiques are str.format templates.
# ---------------------------------------------------------------------------------------

_REVIEWER = {
    "clean": dict(
        joiner="and",
        a=["correct", "accurate", "right", "sound", "exact", "valid", "precise"],
        b=["clear", "coherent", "well organized", "rigorous", "methodical", "tidy",
           "lucid", "well structured"],
        c=["carefully", "cleanly", "confidently", "logically", "neatly",
           "systematically"],
        d=["reasoned throughout", "argued from start to finish", "developed and convincing",
           "laid out and easy to follow", "presented with a firm conclusion"]),
    "slip": dict(
        b=["careless along the way", "sloppy in places", "inconsistent in its working"],
        c=["somewhat", "noticeably", "occasionally"],
        d=["unreliable in its arithmetic", "inaccurate in intermediate work",
           "shaky in the details"]),
    "incomplete": dict(
        b=["sketchy", "thinly justified", "patchy", "underexplained"],
        c=["rather", "somewhat", "noticeably"],
        d=["light on justification", "hasty in its reasoning", "abrupt and elliptical"]),
    "no_marker": dict(
        b=["loosely finished", "informally concluded", "vaguely wrapped up",
           "unclearly concluded"],
        c=["slightly", "somewhat", "rather"],
        d=["ambiguous at the end", "unpolished in presentation", "careless about format"]),
    "verbose": dict(
        b=["verbose", "wordy", "overlong", "padded", "rambling"],
        c=["needlessly", "excessively", "overly", "rather"],
        d=["drawn out", "elaborate", "repetitive in places", "heavy on filler"]),
    "wrong_slip": dict(
        joiner="and",
        a=["incorrect", "wrong", "inaccurate", "flawed", "mistaken"],
        b=["careless", "sloppy", "error prone", "unreliable"],
        c=["arithmetically", "computationally", "numerically"],
        d=["shaky and unconvincing", "inaccurate overall", "untrustworthy in its details"]),
    "wrong_missing": dict(
        joiner="and",
        a=["incorrect", "incomplete", "wrong", "unfinished", "inaccurate"],
        b=["hasty", "patchy", "disjointed", "underdeveloped"],
        c=["noticeably", "seriously", "clearly", "badly"],
        d=["incomplete in its reasoning", "gappy and unconvincing",
           "missing essential work"]),
    "wrong_final": dict(
        joiner="despite looking",
        a=["incorrect", "wrong", "inaccurate", "mistaken"],
        b=["orderly", "plausible", "methodical", "tidy"],
        c=["ultimately", "unfortunately", "decisively"],
        d=["unconvincing", "off target", "unsound in its conclusion"]),
    "no_answer": dict(
        joiner="and",
        a=["unfinished", "inconclusive", "incomplete", "unresolved"],
        b=["aimless", "disorganized", "vague", "unfocused"],
        c=["entirely", "completely", "clearly"],
        d=["lacking a clear outcome", "without a conclusion", "inconclusive overall"]),
    "blur": dict(
        joiner="but",
        a=["mixed", "uneven", "middling", "so so"],
        b=["partly clear", "partly plausible", "hard to judge"],
        c=["somewhat", "moderately", "arguably"],
        d=["uncertain overall", "neither convincing nor clearly wrong", "ambiguous"]),
}

_CORRECT_HEADS = ["correct", "accurate", "right", "sound"]
_ISSUES = ("slip", "incomplete", "no_marker", "verbose")  # Priority order.

_USER = {
    "positive": (
        ["Thanks, that looks right to me!", "Great, this makes sense.",
         "I'm happy with this.", "Nice, I feel confident about this now.",
         "Perfect, exactly what I needed.", "Oh good, that clears it up.",
         "Awesome, thank you!", "Lovely, I follow all of it."],
        ["Really helpful.", "I trust this one.", "Easy to follow too.", "",
         "I'd happily use this.", "Much appreciated."]),
    "mixed": (
        ["I think this is right, thanks.", "Seems fine to me.", "Okay, I mostly get it.",
         "Probably correct, I guess.", "Alright, this works for me."],
        []),
    "negative": (
        ["Hmm, I don't think that's right.", "This confused me.", "I'm not convinced.",
         "That doesn't look right to me.", "I'm lost, honestly.",
         "This didn't help me much.", "Something feels off here."],
        ["Could you check it again?", "I'm not sure I can trust it.",
         "I feel more confused than before.", "", "Not what I was hoping for.",
         "I'd rather not rely on this."]),
    "vague": (
        ["Not sure what to make of this.", "Hard to tell if this helps.",
         "I can't decide whether I like it.", "Hmm, maybe?"],
        ["I'll have to think about it.", "", "It's a bit unclear to me."]),
}
_USER_ISSUE = {
    "slip": ["Something in the middle felt off, though.",
             "I got a little suspicious halfway through."],
    "incomplete": ["I'd have liked a bit more explanation.",
                   "It jumped ahead a little for me."],
    "no_marker": ["I wasn't sure where it ended, though.",
                  "I had to hunt for the conclusion."],
    "verbose": ["It felt like a lot of reading, though.", "It went on a bit long for me.",
                "Took me a while to get through it."],
}

_CRITIQUE = {
    "clean": ["{checked}; the final answer {answer} is correct and clearly marked.",
              "I re-did the work: {checked}, and the final answer {answer} is right.",
              "No errors: {checked}. The final answer {answer} matches and is marked."],
    "slip": ["Line {line}: {claim} is wrong ({expr} = {true}), even though the final "
             "answer comes out right.",
             "There is a slip on line {line}: {claim} should be {expr} = {true}."],
    "incomplete": ["It skips a step: {step} never appears.",
                   "The value {value} ({step}) is never worked out."],
    "no_marker": ["The final answer is not marked; end with '#### {answer}'.",
                  "No '####' line: state the final answer as '#### {answer}'."],
    "verbose": ["It is too long: {length} characters where about {ref_length} suffice.",
                "Trim it: {length} characters for a solution that needs about "
                "{ref_length}."],
    "wrong_slip": ["The first error is on line {line}: {claim} is wrong, since "
                   "{expr} = {true}. The final answer {answer} is therefore incorrect.",
                   "Line {line} claims {claim}, but {expr} = {true}; everything after "
                   "it, including the final answer {answer}, is off."],
    "wrong_missing": ["The solution never computes {step}, so the final answer {answer} "
                      "is wrong.",
                      "The first missing value is {value} (from {step}); without it the "
                      "final answer {answer} is incorrect."],
    "wrong_final": ["{checked}, but the final answer {answer} is wrong.",
                    "The working holds up ({checked}), yet the final answer {answer} "
                    "is incorrect."],
    "no_answer": ["There is no final answer.{missing_note}",
                  "The response never states a final answer.{missing_note}"],
    "unmarked": ["The final answer is not marked with '####' either.",
                 "It also lacks the '####' line."],
    "blur": ["Hard to say whether this is right; parts look fine, parts are unclear.",
             "I cannot tell for sure whether the working holds up."],
    "flip_positive": ["The working looks fine and the final answer seems right.",
                      "Nothing stands out as wrong here."],
    "flip_negative": ["The final answer looks wrong to me.",
                      "Something in the working seems to be off."],
}


@dataclasses.dataclass(frozen=True)
class Analysis:
  """What the critic found in one response."""
  correct: bool
  answer: Optional[str]  # Extracted final answer.
  has_marker: bool
  claims: Tuple[answers.Claim, ...]
  wrong_claim: Optional[answers.Claim]  # First wrong claim.
  missing: Optional[answers.Step]  # First reference step whose value is never reached.
  reached: int  # Reference values the response reaches.
  num_reference: int
  length: int
  reference_length: int
  verbose: bool

  @property
  def issues(self) -> Tuple[str, ...]:
    """For a correct answer: its shortcomings in priority order."""
    flags = {"slip": self.wrong_claim is not None, "incomplete": self.missing is not None,
             "no_marker": not self.has_marker, "verbose": self.verbose}
    return tuple(k for k in _ISSUES if flags[k])

  @property
  def category(self) -> str:
    """Correct: "clean" or its first issue. Wrong: the first cause found."""
    if self.correct:
      return self.issues[0] if self.issues else "clean"
    if self.answer is None:
      return "no_answer"
    if self.wrong_claim is not None:
      return "wrong_slip"
    if self.missing is not None:
      return "wrong_missing"
    return "wrong_final"

  @property
  def score(self) -> int:
    if self.correct:
      return {0: 10, 1: 7, 2: 6}.get(len(self.issues), 5)
    if self.answer is None:
      return 0
    partial = self.num_reference and 2 * self.reached >= self.num_reference
    # Credit for sound arithmetic only when there is arithmetic to check: a bare wrong
    # guess must not outscore a worked attempt (online methods would learn to guess).
    sound = bool(self.claims) and self.wrong_claim is None
    return 1 + int(self.has_marker) + int(sound) + int(bool(partial))


def analyze(example: tasks.Example, response: str, *, verbose_ratio: float = 2.5,
            verbose_slack: int = 40) -> Analysis:
  """Checks ``response`` against ``example``'s reference steps and answer."""
  if example.answer is None:
    raise ValueError(f"The critic needs a reference answer; example {example.uid!r} has "
                     "none (use an LLM judge for such prompts).")
  answer, how = answers.find_final_answer(response)
  claims = tuple(answers.find_claims(response))
  numbers = answers.numbers_in(response)
  missing, reached = None, 0
  for step in example.steps:
    value = answers.parse_number(step.value)
    if value is not None and any(answers.number_matches(w, value, v) for w, v in numbers):
      reached += 1
    elif missing is None:
      missing = step
  reference_length = max(len(tasks.reference_response(example)),
                         len((example.reference or "").strip()))
  length = len(response.strip())
  limit = max(verbose_ratio * reference_length, reference_length + verbose_slack)
  return Analysis(
      correct=answers.check_answer(example, response), answer=answer,
      has_marker=how == "marker", claims=claims,
      wrong_claim=next((c for c in claims if not c.ok), None), missing=missing,
      reached=reached, num_reference=len(example.steps), length=length,
      reference_length=reference_length, verbose=length > limit)


def _reviewer(rng: random.Random, category: str, issues: Sequence[str]) -> str:
  if category not in _ISSUES:
    bank = _REVIEWER[category]
    return (f"{rng.choice(bank['a']).capitalize()} {bank['joiner']} "
            f"{rng.choice(bank['b'])}; {rng.choice(bank['c'])} {rng.choice(bank['d'])}.")
  # Correct with issues: "Correct but wordy and sketchy; needlessly drawn out."
  qualities = " and ".join(rng.choice(_REVIEWER[i]["b"]) for i in issues[:2])
  main = _REVIEWER[issues[0]]
  return (f"{rng.choice(_CORRECT_HEADS).capitalize()} but {qualities}; "
          f"{rng.choice(main['c'])} {rng.choice(main['d'])}.")


def _user(rng: random.Random, mood: str, issues: Sequence[str] = ()) -> str:
  openers, follow_ups = _USER[mood]
  parts = [rng.choice(openers)]
  if issues:
    parts.append(rng.choice(_USER_ISSUE[issues[0]]))
  elif follow_ups:
    parts.append(rng.choice(follow_ups))
  return " ".join(p for p in parts if p)


def _fields(a: Analysis) -> Dict[str, object]:
  n_ok = sum(c.ok for c in a.claims)
  checked = (f"all {n_ok} calculation{'s' if n_ok != 1 else ''} check out" if a.claims
             and n_ok == len(a.claims) else "there are no calculations to check"
             if not a.claims else f"{n_ok} of {len(a.claims)} calculations check out")
  wrong, missing = a.wrong_claim, a.missing
  return dict(
      answer=a.answer, checked=checked, length=a.length, ref_length=a.reference_length,
      line=wrong.line if wrong else "", claim=wrong.text if wrong else "",
      expr=wrong.expr if wrong else "",
      true=("undefined (division by zero)" if wrong and wrong.value is None else
            answers.format_number(wrong.value) if wrong else ""),
      step=missing.text if missing else "", value=missing.value if missing else "",
      missing_note=f" The first missing step is {missing.text}." if missing else "")


def _critique(rng: random.Random, a: Analysis) -> str:
  fields = _fields(a)
  category = a.category
  if not a.correct or category == "clean":
    parts = [rng.choice(_CRITIQUE[category]).format(**fields)]
    if not a.correct and a.answer is not None and not a.has_marker:
      parts.append(rng.choice(_CRITIQUE["unmarked"]))
  else:
    parts = [f"The final answer {a.answer} is correct."]
    parts += [rng.choice(_CRITIQUE[i]).format(**fields) for i in a.issues]
  text = " ".join(parts)
  return text[:1].upper() + text[1:]


class Critic:
  """Rule-based feedback env (see the module docstring)."""

  def __init__(self, *, noise: float = 0.0, seed: int = 0, verbose_ratio: float = 2.5,
               verbose_slack: int = 40, critique_numbers: bool = True):
    if not 0.0 <= noise <= 1.0:
      raise ValueError(f"noise must be in [0, 1], got {noise}.")
    self.noise, self.seed = noise, seed
    self.verbose_ratio, self.verbose_slack = verbose_ratio, verbose_slack
    self.critique_numbers = critique_numbers

  def config_key(self) -> str:
    numbers = "" if self.critique_numbers else ", critique_numbers=False"
    return (f"critic(noise={self.noise}, seed={self.seed}, verbose_ratio="
            f"{self.verbose_ratio}, verbose_slack={self.verbose_slack}{numbers}, "
            f"v={VERSION})")

  def no_answer_verdicts(self, kind: str) -> Tuple[str, ...]:
    """Every text this critic writes for a response with no final answer (score 0).

    Reviewer: all compositions of the ``no_answer`` bank (its words "incomplete",
    "unfocused", "disorganized" are those of the paper's fully negative condition);
    user: every negative-mood reply; critique: the no-answer sentences without the
    question-specific missing step.
    """
    if kind == "reviewer":
      bank = _REVIEWER["no_answer"]
      return tuple(f"{a.capitalize()} {bank['joiner']} {b}; {c} {d}." for a, b, c, d in
                   itertools.product(bank["a"], bank["b"], bank["c"], bank["d"]))
    if kind == "user":
      openers, follow_ups = _USER["negative"]
      return tuple(" ".join(p for p in (o, f) if p)
                   for o, f in itertools.product(openers, follow_ups))
    if kind == "critique":
      return tuple(t.format(missing_note="") for t in _CRITIQUE["no_answer"])
    raise KeyError(f"Unknown condition kind {kind!r}; known: reviewer, user, critique.")

  def analyze(self, example: tasks.Example, response: str) -> Analysis:
    return analyze(example, response, verbose_ratio=self.verbose_ratio,
                   verbose_slack=self.verbose_slack)

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    return [self.one(q.example, q.response) for q in as_queries(batch)]

  def one(self, example: tasks.Example, response: str) -> Feedback:
    """Feedback on one response; deterministic in (seed, example.uid, response)."""
    fb = self._one(example, response)
    if not self.critique_numbers:
      fb = dataclasses.replace(fb, critique=NUMBER.sub("N", fb.critique))
    return fb

  def _one(self, example: tasks.Example, response: str) -> Feedback:
    a = self.analyze(example, response)
    rng = random.Random(tasks.stable_hash("critic", self.seed, example.uid, response))
    noise_rng = random.Random(tasks.stable_hash("noise", self.seed, example.uid, response))
    if self.noise and noise_rng.random() < self.noise:
      return self._noisy(noise_rng, a)
    mood = "positive" if a.category == "clean" else "mixed" if a.correct else "negative"
    return Feedback(user=_user(rng, mood, a.issues if a.correct else ()),
                    reviewer=_reviewer(rng, a.category, a.issues),
                    critique=_critique(rng, a), score=a.score, correct=a.correct)

  @staticmethod
  def _noisy(rng: random.Random, a: Analysis) -> Feedback:
    if rng.random() < 0.5:  # Blur.
      return Feedback(user=_user(rng, "vague"), reviewer=_reviewer(rng, "blur", ()),
                      critique=rng.choice(_CRITIQUE["blur"]), score=5, correct=a.correct)
    if a.correct:  # Flip to a negative verdict.
      return Feedback(user=_user(rng, "negative"), reviewer=_reviewer(rng, "wrong_final", ()),
                      critique=rng.choice(_CRITIQUE["flip_negative"]),
                      score=rng.randint(1, 3), correct=a.correct)
    return Feedback(user=_user(rng, "positive"), reviewer=_reviewer(rng, "clean", ()),
                    critique=rng.choice(_CRITIQUE["flip_positive"]),
                    score=rng.randint(8, 10), correct=a.correct)


@FEEDBACK_ENVS.register("critic")
def critic(**kwargs) -> Critic:
  """``"critic(noise=0.0, seed=0, verbose_ratio=2.5, verbose_slack=40)"``."""
  return Critic(**kwargs)
