"""The end-to-end FCP experiment as a list of stages (the ``fcp_jax.pipeline`` driver).

``run(config, workdir)`` runs (or resumes) every stage of a pipeline config such as
``configs/arith_fcp.py``. Each stage's run config is derived from the experiment's
shared settings (``config_lib.stage_config``) and each stage is keyed by what it
consumed (``fcp_jax.stages``): a re-run skips what is done, recomputes exactly what a
changed setting reaches, and ``<workdir>/<stage>`` links to the stage's folder.

0. ``base`` (only with ``config.pretrained``, a ``pretrained.PRETRAINED`` spec such
   as ``"smollm2(pad_to_multiple=128)"``): the pretrained params as a checkpoint and its
   tokenizer; the warm-up starts from it and every stage uses that tokenizer;
1. ``data``: train, validation and test prompts of ``config.data.task``;
2. ``warmup``: SFT on reference solutions under the null condition ``<EF></EF>``
   (``data.direct_fraction`` of them answer-only; ``data.warmup_conditions`` of the rows
   under a feedback text drawn at random from ``condition_bank``, independent of the
   response, so the policy has seen feedback text before FCP gives it a meaning);
3. ``collect``: ``k`` samples per prompt from the warm-up (T=1, null condition),
   feedback from the cached env, prompts with mixed outcomes only, ``pairs`` correct and
   ``pairs`` incorrect responses each (``pairs=0``: all of them), plus the warm-up's
   references of ``references`` further prompts with the env's feedback on them → the
   triples dataset, the positive pool (``pool.json``: score ≥ ``pool_min_score``, see
   ``feedback/pool.py``) and its mirror image, the worst verdicts (``negatives.json``:
   wrong and score ≤ ``negative_max_score``), which evaluation draws its fully negative
   condition from. Feedback that failed is asked again; if it still fails the stage
   stops (``rollout.FeedbackFailedError``) and a re-run asks only about those;
4. ``offline_fcp``: NLL of ``response | <EF>c</EF> question`` on the triples;
5. ``fcp_bootstrap``: online rounds from offline FCP (``training.online``);
6. ``rft``: baseline, fine-tunes the warm-up on every correct sample (under the null
   condition) of the collection plus an equal-budget second collection;
7. ``grpo``: baseline, GRPO from the warm-up with the score/10 reward for as many
   rounds as make the same number of generated samples as FCP used;
8. ``rft_collect`` then ``rft_grpo``: baseline RFT+GRPO, FCP's two phases with scalar
   rewards (RFT on the collection's correct samples, GRPO for the bootstrap's rounds);
9. ``eval/<method>`` (test) and ``validation/<method>``: greedy accuracy under each
   condition (``fcp_jax.evaluation``).

A training stage runs only when a method of ``config.methods`` needs it
(``METHOD_CHAINS``). ``budget.train_tokens`` gives every method the same training
tokens beyond the warm-up: each stage's share and its steps (or GRPO's updates per
round) are derived from it (``token_targets``) and ``budget_checks`` holds each method
to ±10% of it; every method also gets the same generated samples and the same
reference rows (``collect.references``: FCP and RFT read them, so with GRPO it must be 0).

Finally ``results.json``, ``results.md`` and ``plots/`` (accuracy per method, accuracy
by condition, training curves) are written in the workdir, with the stage keys that
produced them. Every stage asks the feedback env through one JSONL cache in the stage
store (``feedback_cache.jsonl``), so no question is asked twice. ``config.stage_workers``
processes share the stages after the collection (``fcp_jax.stage_workers``): each stage
still runs once, and the results are those of one process.
"""

import copy
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from fcp_jax import config_lib
from fcp_jax import distributed
from fcp_jax import evaluation
from fcp_jax import policy as policy_lib
from fcp_jax import rollout as rollout_lib
from fcp_jax import stage_workers as stage_workers_lib
from fcp_jax import stages as stages_lib
from fcp_jax.data import input_pipeline as pipeline_lib
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.data import tfds_builders
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.feedback import pool as pool_lib
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import offline
from fcp_jax.training import online

DONE = stages_lib.DONE
TFDS_DIR = "tfds"
BANK_PROMPTS = 1024  # Prompts whose made-up responses give the warm-up's condition bank.
FEEDBACK_CACHE = "feedback_cache.jsonl"
# Method -> (stage folder holding its final params, condition it is meant to be used with).
METHOD_STAGES = {"warmup": ("warmup", "null"), "offline_fcp": ("offline_fcp", "pool"),
                 "fcp_bootstrap": ("fcp_bootstrap", "pool"), "rft": ("rft", "null"),
                 "grpo": ("grpo", "null"), "rft_grpo": ("rft_grpo", "null")}
# Method -> the stages it trains through after the shared warm-up (the warm-up: itself).
METHOD_CHAINS = {"warmup": ("warmup",), "offline_fcp": ("collect", "offline_fcp"),
                 "fcp_bootstrap": ("collect", "offline_fcp", "fcp_bootstrap"),
                 "rft": ("collect", "rft"), "grpo": ("grpo",),
                 "rft_grpo": ("collect", "rft_collect", "rft_grpo")}
# Methods whose training tokens beyond the warm-up ``budget.train_tokens`` sets
# (``token_targets``); offline FCP is the first part of FCP+bootstrap.
MATCHED_METHODS = ("fcp_bootstrap", "rft", "grpo", "rft_grpo")
BUDGET_TOLERANCE = 0.1  # A matched method's tokens may differ from the budget by 10%.
# Cadence key -> times per run of a budgeted offline stage that leaves the key None.
BUDGET_CADENCE = {"checkpoint.every": 5, "eval.every": 2}


# ---------------------------------------------------------------------------------------
# Helpers of the stages.
# ---------------------------------------------------------------------------------------


def _with(cfg: ml_collections.ConfigDict, **updates) -> ml_collections.ConfigDict:
  """A copy of a config with dotted-key updates (``{"data.data_dir": ...}``)."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    for key, value in updates.items():
      node = out
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return out


def _build_once(dataset: str, splits: Mapping[str, List[Dict[str, Any]]], data_dir: str,
                name: str):
  """``build_dataset`` on process 0; every process returns once it can be read."""
  if distributed.is_primary():
    build_dataset(dataset, splits, data_dir, name)
  distributed.barrier(f"dataset {data_dir} {name}")


def _rows(ro: rollout_lib.Rollouts) -> List[Dict[str, Any]]:
  return [dict(example=e, question=q, response=t, feedback=fb)
          for e, q, t, fb in zip(ro.examples, ro.questions, ro.texts, ro.feedback)]


def warmup_records(examples: Sequence[tasks_lib.Example], *, instruction: str, kind: str,
                   seed: int, direct_fraction: float = 0.0, condition_fraction: float = 0.0,
                   bank: Sequence[str] = ()) -> List[Dict[str, Any]]:
  """The warm-up's rows (triples format): reference responses and their conditions.

  ``direct_fraction`` of the references are answer-only (``#### n``); the condition is
  null (``""``, i.e. ``<EF></EF>``) except for ``condition_fraction`` of the rows, which
  get a text of ``bank`` drawn at random. Both draws are seeded per position and
  independent of each other.
  """
  if condition_fraction > 0 and not bank:
    raise ValueError("condition_fraction > 0 needs a non-empty condition bank.")
  n = len(examples)
  direct = np.random.default_rng([seed, 11]).random(n) < direct_fraction  # [N]
  rng = np.random.default_rng([seed, 12])
  conditions = [bank[rng.integers(len(bank))] if use else ""
                for use in rng.random(n) < condition_fraction]  # [N]
  return [dict(uid=e.uid, question=tasks_lib.format_question(e, instruction),
               response=tasks_lib.reference_response(e, direct=bool(d)), feedback=c,
               kind=kind, score=None, correct=None)
          for e, d, c in zip(examples, direct, conditions)]


def reference_rows(env, examples: Sequence[tasks_lib.Example], start: int, count: int,
                   *, instruction: str, kind: str, seed: int, direct_fraction: float
                   ) -> List[Dict[str, Any]]:
  """The warm-up's references of ``examples[start:start + count]``, with feedback.

  The responses are exactly those the warm-up trained on (``warmup_records``, same
  seed and ``direct_fraction``), so offline FCP sees them again with the feedback the
  env gives them: clean chains earn positive conditions, answer-only ones "correct but
  thinly justified". Rows have the layout of ``sample_with_feedback``'s.
  """
  if count <= 0:
    return []
  if start + count > len(examples):
    raise ValueError(f"collect.references={count} needs {start + count} train prompts "
                     f"(collect.prompts={start} come first); data.train_size is "
                     f"{len(examples)}.")
  picked = list(zip(examples, warmup_records(
      examples, instruction=instruction, kind=kind, seed=seed,
      direct_fraction=direct_fraction)))[start:start + count]
  queries = [(e, r["response"]) for e, r in picked]
  feedback = rollout_lib.retry_failed(env, queries, env.feedback(queries),
                                      where="reference rows")
  return [dict(example=e, question=r["question"], response=r["response"], feedback=fb)
          for (e, r), fb in zip(picked, feedback)]


def condition_bank(env, examples: Sequence[tasks_lib.Example], *, kind: str, seed: int
                   ) -> List[str]:
  """Distinct feedback texts of ``kind`` that ``env`` gives on made-up responses.

  Each example gets one response drawn from four: its reference chain or bare answer,
  right or ending wrong (``tasks.wrong_response``), so the bank holds the env's positive
  and negative wording alike. The warm-up shows these texts at random (independent of
  the response it trains on): the policy learns to read past feedback text in the
  condition slot, as a pretrained model would, without learning what it means.
  """
  rng = np.random.default_rng([seed, 13])
  queries = []
  for e in examples:
    direct, wrong = bool(rng.integers(2)), bool(rng.integers(2))
    response = (tasks_lib.wrong_response(e, int(rng.choice([-2, -1, 1, 2])),
                                         direct=direct) if wrong
                else tasks_lib.reference_response(e, direct=direct))
    queries.append((e, response))
  feedback = rollout_lib.retry_failed(env, queries, env.feedback(queries),
                                      where="condition bank")
  bank = sorted({fb.condition(kind) for fb in feedback} - {""})
  if not bank:
    raise RuntimeError(f"The feedback env gave no {kind!r} text on {len(queries)} "
                       "responses; cannot build the warm-up condition bank.")
  return bank


def is_plain(text: str) -> bool:
  """Whether a sampled text is storable as a text record: non-empty, no special token."""
  return bool(text.strip()) and not any(t in text for t in tokenizer_lib.SPECIAL_TOKENS)


def select_pairs(rows: Sequence[Dict[str, Any]], num_samples: int, pairs: int,
                 seed: int) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
  """Keeps prompts with mixed outcomes; ``pairs`` correct + ``pairs`` incorrect each.

  ``rows`` holds ``num_samples`` consecutive rows per prompt. Empty responses and those
  holding special tokens are dropped (counted), the rest deduplicated per prompt before
  picking (seeded). ``pairs=0`` keeps every sample of a mixed prompt, duplicates
  included: the triples then follow the policy's own distribution (natural proportions).
  """
  rng = np.random.default_rng([seed, 3])
  kept = []
  stats = dict(prompts=0, all_correct=0, all_wrong=0, mixed=0, unstorable_dropped=0)
  for start in range(0, len(rows), num_samples):
    group = rows[start:start + num_samples]
    stats["prompts"] += 1
    plain = [r for r in group if is_plain(r["response"])]
    stats["unstorable_dropped"] += len(group) - len(plain)
    unique = list({r["response"]: r for r in plain}.values())
    right = [r for r in unique if r["feedback"].correct]
    wrong = [r for r in unique if not r["feedback"].correct]
    if not right:
      stats["all_wrong"] += 1
      continue
    if not wrong:
      stats["all_correct"] += 1
      continue
    stats["mixed"] += 1
    if pairs <= 0:
      kept.extend(plain)
      continue
    for bucket in (right, wrong):
      for i in rng.permutation(len(bucket))[:pairs]:
        kept.append(bucket[i])
  return kept, stats


def build_dataset(dataset: str, splits: Mapping[str, List[Dict[str, Any]]], data_dir: str,
                  name: str) -> Dict[str, int]:
  """Builds a TFDS dataset and checks every split reads back complete."""
  tfds_builders.build(dataset, dict(splits), data_dir, name, overwrite=True)
  sizes = {}
  for split, records in splits.items():
    sizes[split] = len(tfds_builders.load_source(dataset, data_dir, name, split))
    if sizes[split] != len(records):
      raise RuntimeError(f"Dataset {dataset}/{name} split {split!r} reads back "
                         f"{sizes[split]} of {len(records)} records.")
  return sizes


def split_records(records: List[Dict[str, Any]], eval_fraction: float, seed: int
                  ) -> Dict[str, List[Dict[str, Any]]]:
  """Seeded train/eval split of dataset records.

  Each split has at least one record; a single record is in both (tiny runs only).
  """
  if not records:
    raise ValueError("split_records: no records to split.")
  order = np.random.default_rng([seed, 5]).permutation(len(records))
  n_eval = min(max(1, int(round(eval_fraction * len(records)))),
               max(len(records) - 1, 1))
  train = order[n_eval:] if len(records) > 1 else order
  return {"train": [records[i] for i in train],
          "eval": [records[i] for i in order[:n_eval]]}


# ---------------------------------------------------------------------------------------
# The experiment and its stages.
# ---------------------------------------------------------------------------------------


class Experiment:
  """What the stages of one workdir share: config, stage store, policy, prompts."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               store: Optional[str] = None, worker: int = 0):
    self.config = config
    self.workdir = workdir
    self.stages = stages_lib.Stages(workdir, store=store, on_change=config.on_change,
                                    worker=worker)
    self.seed = int(config.seed)
    self.feedback_cache = os.path.join(self.stages.store, FEEDBACK_CACHE)
    self.policy: Optional[policy_lib.Policy] = None
    self.train_examples: List[tasks_lib.Example] = []
    self.splits: Dict[str, List[tasks_lib.Example]] = {}
    self.collected: Dict[str, Any] = {}  # The collect stage's record.

  @property
  def system(self) -> Optional[str]:
    return self.config.data.system or None

  def stage(self, name: str) -> ml_collections.ConfigDict:
    """The resolved run config of pipeline section ``name``."""
    return config_lib.stage_config(self.config, name)

  @functools.cached_property
  def sample_tokens(self) -> Dict[str, float]:
    """Mean input tokens of a collected triple as a training row, under its feedback
    (``record``: FCP's rows) and under the null condition (``null``: RFT's, GRPO's)."""
    records = tfds_builders.load_source(
        tfds_builders.TRIPLES, os.path.join(self.stages.path("collect"), TFDS_DIR),
        self.config.offline.data.name, "train")
    out = {}
    for mode in ("record", "null"):
      tokenize = pipeline_lib.Tokenize(self.policy.tok, condition=mode,
                                       system=self.system, max_len=0)
      out[mode] = float(np.mean([len(tokenize.encode(r)[0]) for r in records]))
    return out

  @functools.cached_property
  def env(self):
    """The feedback env behind the store's one cache (loaded once per run)."""
    return online.build_feedback_env(self.config.feedback, self.stages.store,
                                     self.feedback_cache)

  def run(self, name, fn, *, settings, inputs=()):
    inputs = {k: self.stages.key(k) for k in inputs}
    if "base" in self.stages.keys:
      inputs["base"] = self.stages.keys["base"]
    return self.stages.run(name, fn, settings=self._portable(settings), inputs=inputs)

  def _portable(self, settings: Any) -> Any:
    """Settings with the base stage's folder (a tokenizer path) named, not spelled."""
    base = self.stages.folders.get("base")
    settings = stages_lib.jsonable(settings)
    if base is None:
      return settings
    return json.loads(json.dumps(settings).replace(json.dumps(base)[1:-1], "<base>"))

  def generate(self, params, examples, *, rng: int, num_samples: int, where: str
               ) -> rollout_lib.Rollouts:
    """Null-condition samples with feedback, as the collection samples them."""
    col = self.config.collect
    env = self.env
    ro = rollout_lib.generate(
        self.policy.sampler, params, examples, [""] * len(examples), env=env,
        rng=jax.random.PRNGKey(self.seed + rng), num_samples=num_samples,
        method=col.sampling, max_new_tokens=col.max_new_tokens,
        instruction=self.config.data.instruction, system=self.system,
        qlambda=self.policy.qlambda, chunk_prompts=col.batch_prompts)
    return rollout_lib.require_feedback(env, ro, where=where)


def pretrained_base(ex: Experiment):
  """Stage 0: the pretrained model as a checkpoint + tokenizer (``config.pretrained``)."""
  config = ex.config
  if config.get("pretrained"):
    for key, value in (("tokenizer", config.tokenizer),
                       ("warmup.init_from", config.warmup.init_from)):
      if value:
        raise ValueError(f"config.pretrained={config.pretrained!r} and config.{key}="
                         f"{value!r} are both set; keep one.")
    ex.run("base", lambda folder: policy_lib.write_pretrained_base(
        config.pretrained, config.model, folder),
        settings=dict(pretrained=config.pretrained, model=config.model))
    # Every stage reads the base's tokenizer; the warm-up starts from its params.
    base = ex.stages.path("base")
    ex.config = _with(config, **{"tokenizer": base, "warmup.init_from": base})
  ex.policy = policy_lib.Policy(ex.config.model, ex.config.tokenizer,
                                ex.config.warmup.quant, parallel=ex.config.parallel)


SPLITS = ("train", "validation", "test")


def split_prompts(task: str, *, train_size: int, validation_size: int, test_size: int,
                  seed: int) -> Dict[str, List[tasks_lib.Example]]:
  """Train, validation and test prompts of ``task``, disjoint by question.

  Train is the first ``train_size`` of the task's train split and test the first
  ``test_size`` of its held-out split (disjoint from train by the task's own rule);
  validation is drawn from the train split after the train prompts, without any
  question that train or test hold (so up to ``validation_size``). Train and test do
  not depend on ``validation_size``.
  """
  pool = tasks_lib.TASKS.build(task, split="train", size=train_size + validation_size,
                               seed=seed)
  test = tasks_lib.TASKS.build(task, split="eval", size=test_size, seed=seed)
  train = pool[:train_size]
  seen = {e.question for e in train} | {e.question for e in test}
  validation = []
  for e in pool[train_size:]:
    if e.question not in seen:
      validation.append(e)
      seen.add(e.question)
  return dict(train=train, validation=validation, test=test)


def prompts(ex: Experiment):
  """Stage 1: train, validation and test prompts (keyed by their content)."""
  data = ex.config.data
  task_seed = config_lib.shared_value(ex.config, "data.task_seed")
  splits = split_prompts(data.task, train_size=data.train_size,
                         validation_size=data.validation_size, test_size=data.eval_size,
                         seed=task_seed)
  lines = {name: [json.dumps(e.to_dict()) + "\n" for e in splits[name]]
           for name in SPLITS}
  digest = hashlib.sha256("\0".join("".join(lines[name]) for name in SPLITS)
                          .encode("utf-8")).hexdigest()

  def make(folder):
    if distributed.is_primary():
      for name, text in lines.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
          f.writelines(text)
    return dict({name: len(splits[name]) for name in SPLITS}, digest=digest)

  ex.stages.run("data", make, settings=dict(data=data, task_seed=task_seed),
                inputs={"examples": digest})
  ex.train_examples, ex.splits = splits["train"], splits


def warmup(ex: Experiment):
  """Stage 2: SFT on reference solutions under the null condition."""
  config, data = ex.config, ex.config.data
  cfg = ex.stage("warmup")

  def fn(folder):
    bank = []
    if data.warmup_conditions > 0:
      bank = condition_bank(ex.env, ex.train_examples[:BANK_PROMPTS],
                            kind=config.kind, seed=ex.seed)
    records = warmup_records(ex.train_examples, instruction=data.instruction,
                             kind=config.kind, seed=ex.seed,
                             direct_fraction=data.direct_fraction,
                             condition_fraction=data.warmup_conditions, bank=bank)
    tfds_dir = os.path.join(folder, TFDS_DIR)
    _build_once(tfds_builders.TRIPLES, split_records(records, 0.05, ex.seed), tfds_dir,
                cfg.data.name)
    return offline.run(_with(cfg, **{"data.data_dir": tfds_dir}), folder)

  ex.run("warmup", fn, inputs=("data",), settings=dict(
      stage=cfg, data=data, kind=config.kind,
      feedback=config.feedback if data.warmup_conditions > 0 else None))


def collect(ex: Experiment) -> Dict[str, Any]:
  """Stage 3: samples + feedback from the warm-up → triples, pool c+, negatives."""
  config, col, data, kind = ex.config, ex.config.collect, ex.config.data, ex.config.kind

  def fn(folder):
    ro = ex.generate(ex.policy.load(ex.stages.path("warmup")),
                     ex.train_examples[:col.prompts], rng=101,
                     num_samples=col.num_samples, where="collect")
    rows = _rows(ro)
    kept, stats = select_pairs(rows, col.num_samples, col.pairs, ex.seed)
    if not kept:
      raise RuntimeError(f"No prompt had mixed outcomes ({stats}); the warm-up is too "
                         "weak or too strong for this task.")
    references = reference_rows(ex.env, ex.train_examples, col.prompts,
                                col.references, instruction=data.instruction, kind=kind,
                                seed=ex.seed, direct_fraction=data.direct_fraction)
    records = [tfds_builders.triple_record(r["example"], r["question"], r["response"],
                                           r["feedback"], kind) for r in kept + references]
    _build_once(tfds_builders.TRIPLES, split_records(records, col.eval_fraction, ex.seed),
                os.path.join(folder, TFDS_DIR), config.offline.data.name)
    feedback = ro.feedback
    pool = pool_lib.ConditionPool.build(feedback, kind=kind, min_score=col.pool_min_score,
                                        require_correct=col.pool_require_correct)
    try:
      negatives = pool_lib.ConditionPool.build(
          feedback, kind=kind, min_score=0, max_score=col.negative_max_score,
          require_incorrect=True)
    except pool_lib.EmptyPoolError:  # No wrong sample scored that low (warned below).
      negatives = ()
    if distributed.is_primary():
      pool.save(os.path.join(folder, "pool.json"))
      if negatives:
        negatives.save(os.path.join(folder, "negatives.json"))
      # Correct samples for the RFT baseline (its second, equal-budget share is later).
      stages_lib.write_json(os.path.join(folder, "correct.json"),
                            _correct(rows + references))
    return dict(stats, samples=len(rows), triples=len(records), pool=len(pool),
                negatives=len(negatives), references=len(references),
                pool_stats=pool.stats, sample_accuracy=float(np.mean(
                    [fb.correct for fb in feedback])))

  ex.collected = ex.run("collect", fn, inputs=("data", "warmup"), settings=dict(
      collect=col, data=data, kind=kind, feedback=config.feedback, seed=ex.seed,
      model=config.model, tokenizer=config.tokenizer, quant=config.warmup.quant))
  return ex.collected


def _correct(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  return [dict(uid=r["example"].uid, question=r["question"], response=r["response"],
               feedback=r["feedback"].to_dict()) for r in rows
          if r["feedback"].correct and is_plain(r["response"])]


def with_token_steps(cfg: ml_collections.ConfigDict, tokens: float
                     ) -> ml_collections.ConfigDict:
  """An offline stage's ``cfg`` with as many steps as consume ``tokens`` (0: as set).

  Under a budget the stage's ``total_steps`` is 0 (``check_budget``); a cadence left
  None (``checkpoint.every``, ``eval.every``) becomes ``BUDGET_CADENCE`` times per run.
  """
  if not tokens:
    return cfg
  steps = offline.steps_for_tokens(cfg, tokens)
  logging.info("Token budget %s: %d steps.", f"{tokens:,.0f}", steps)
  cadence = {key: max(steps // times, 1) for key, times in BUDGET_CADENCE.items()
             if config_lib.get(cfg, key) is None}
  return _with(cfg, total_steps=steps, **cadence)


def online_samples(config: ml_collections.ConfigDict) -> int:
  """Samples FCP generates online: rounds x prompts per round x samples per prompt."""
  boot = config.bootstrap.online
  return boot.rounds * boot.prompts_per_step * boot.num_samples


def token_targets(ex: Experiment) -> Dict[str, float]:
  """Input tokens each training stage gets under ``budget.train_tokens`` ({} if 0).

  Every method of ``MATCHED_METHODS`` trains on the budget in all:
  * FCP+bootstrap: offline FCP gets the budget less the bootstrap's rows (its online
    samples x ``online.epochs`` x the mean collected row under its feedback);
  * RFT: its one offline stage;
  * GRPO: its online rounds (``online.train_tokens``: updates per round to match);
  * RFT+GRPO: RFT on the collection gets the budget less the GRPO part's rows (the
    bootstrap's rounds, one pass, the mean collected row under the null condition).
  Offline stages get the exact steps (``offline.steps_for_tokens``); the online shares
  of FCP and RFT+GRPO are estimates, so ``budget_checks`` compares what each used.
  """
  config = ex.config
  total = float(config.budget.train_tokens)
  if not total:
    return {}
  rows = ex.sample_tokens
  boot = config.bootstrap.online
  targets = dict(
      offline_fcp=total - online_samples(config) * float(boot.epochs) * rows["record"],
      rft=total, rft_collect=total - online_samples(config) * rows["null"], grpo=total)
  for name, value in targets.items():
    if value <= 0:
      raise ValueError(f"config.budget.train_tokens={total:,.0f} leaves {name} nothing "
                       "after the online rows; raise it.")
  return targets


def offline_fcp(ex: Experiment):
  """Stage 4: offline FCP from the warm-up on the collected triples."""
  cfg = ex.stage("offline")
  tokens = token_targets(ex).get("offline_fcp", 0)
  run_cfg = _with(cfg, **{
      "data.data_dir": os.path.join(ex.stages.path("collect"), TFDS_DIR),
      "init_from": ex.stages.path("warmup")})  # Paths: not settings (inputs say it).
  ex.run("offline_fcp", lambda folder: offline.run(with_token_steps(run_cfg, tokens),
                                                   folder),
         settings=dict(stage=cfg, train_tokens=tokens), inputs=("warmup", "collect"))


def fcp_bootstrap(ex: Experiment):
  """Stage 5: online bootstrapping from offline FCP under pool c+."""
  cfg = ex.stage("bootstrap")
  ex.run("fcp_bootstrap", lambda folder: online.run(_with(cfg, **{
      "init_from": ex.stages.path("offline_fcp"),
      "online.pool": os.path.join(ex.stages.path("collect"), "pool.json")}), folder,
      feedback_cache=ex.feedback_cache),
      settings=dict(stage=cfg), inputs=("offline_fcp", "collect"))


def _rft_run(ex: Experiment, folder: str, extra: Sequence[Dict[str, Any]],
             tokens: float) -> Dict[str, Any]:
  """RFT from the warm-up on the collection's correct samples plus those of ``extra``."""
  cfg = ex.stage("rft")
  with open(os.path.join(ex.stages.path("collect"), "correct.json")) as f:
    correct = json.load(f) + _correct(extra)
  unique = list({(r["question"], r["response"]): r for r in correct}.values())
  tfds_dir = os.path.join(folder, TFDS_DIR)
  _build_once(tfds_builders.TRIPLES, split_records(
      [dict(r, kind=ex.config.kind) for r in unique], 0.05, ex.seed), tfds_dir,
              cfg.data.name)
  run_cfg = _with(cfg, **{"data.data_dir": tfds_dir, "init_from": ex.stages.path("warmup")})
  return dict(offline.run(with_token_steps(run_cfg, tokens), folder),
              correct_unique=len(unique))


def rft(ex: Experiment):
  """Stage 6: RFT on the collection's correct samples plus an equal online share."""
  config, col = ex.config, ex.config.collect
  per_prompt = config.bootstrap.online.num_samples
  extra_prompts = online_samples(config) // per_prompt
  tokens = token_targets(ex).get("rft", 0)

  def fn(folder):
    n = len(ex.train_examples)
    extra = ex.generate(ex.policy.load(ex.stages.path("warmup")),
                        [ex.train_examples[i % n]
                         for i in range(col.prompts, col.prompts + extra_prompts)],
                        rng=202, num_samples=per_prompt, where="rft")
    return dict(_rft_run(ex, folder, _rows(extra), tokens), samples=len(extra))

  ex.run("rft", fn, inputs=("data", "warmup", "collect"), settings=dict(
      stage=ex.stage("rft"), collect=col, extra_prompts=extra_prompts,
      per_prompt=per_prompt, data=config.data, feedback=config.feedback,
      train_tokens=tokens))


def grpo_samples_per_round(config: ml_collections.ConfigDict) -> int:
  return config.grpo.online.prompts_per_step * config.grpo.online.num_samples


def grpo_rounds(config: ml_collections.ConfigDict, collected: Mapping[str, Any]) -> int:
  """GRPO's rounds: ``grpo.online.rounds``, or as many as match FCP's samples."""
  budget = collected["samples"] + online_samples(config)
  return config.grpo.online.rounds or max(
      1, math.ceil(budget / grpo_samples_per_round(config)))


def grpo(ex: Experiment):
  """Stage 7: GRPO from the warm-up with the same number of generated samples."""
  cfg = _with(ex.stage("grpo"), **{
      "online.rounds": grpo_rounds(ex.config, ex.collected),
      "online.train_tokens": token_targets(ex).get("grpo", 0)})
  ex.run("grpo", lambda folder: online.run(
      _with(cfg, init_from=ex.stages.path("warmup")), folder,
      feedback_cache=ex.feedback_cache), settings=dict(stage=cfg), inputs=("warmup",))


def rft_collect(ex: Experiment):
  """RFT+GRPO's first part: RFT on the collection's correct samples only."""
  tokens = token_targets(ex).get("rft_collect", 0)
  ex.run("rft_collect", lambda folder: _rft_run(ex, folder, (), tokens),
         inputs=("data", "warmup", "collect"),
         settings=dict(stage=ex.stage("rft"), kind=ex.config.kind, train_tokens=tokens))


def rft_grpo(ex: Experiment):
  """RFT+GRPO's second part: GRPO from ``rft_collect`` for the bootstrap's rounds.

  Phase by phase the same samples as FCP+bootstrap: the collection offline, then the
  bootstrap's rounds x prompts x samples online, one pass each (GRPO's other settings).
  """
  boot = ex.config.bootstrap.online
  cfg = _with(ex.stage("grpo"), **{f"online.{k}": boot[k] for k in (
      "rounds", "prompts_per_step", "num_samples", "epochs")})
  ex.run("rft_grpo", lambda folder: online.run(
      _with(cfg, init_from=ex.stages.path("rft_collect")), folder,
      feedback_cache=ex.feedback_cache), settings=dict(stage=cfg),
      inputs=("rft_collect",))


# Training stages after the collection, in order (a stage runs when a method needs it).
TRAINING_STAGES = {"offline_fcp": offline_fcp, "fcp_bootstrap": fcp_bootstrap,
                   "rft": rft, "grpo": grpo, "rft_collect": rft_collect,
                   "rft_grpo": rft_grpo}


EVAL_STAGES = {"test": "eval", "validation": "validation"}  # Split -> stage folder.


def evaluate_method(ex: Experiment, split: str, method: str) -> Dict[str, Any]:
  """Stage 8: ``method``'s greedy accuracy under each condition, on ``split``.

  ``test`` stages are ``eval/<method>``, ``validation`` ones ``validation/<method>``;
  tuning reads validation only, reported numbers come from test.
  """
  if split not in EVAL_STAGES:
    raise ValueError(f"config.eval.splits: unknown split {split!r}; known: "
                     f"{sorted(EVAL_STAGES)}.")
  if method not in METHOD_STAGES:
    raise KeyError(f"config.methods: unknown method {method!r}; known: "
                   f"{sorted(METHOD_STAGES)}.")
  config, cfg = ex.config, ex.stage("eval")
  ev = cfg.eval
  examples = ex.splits[split][:ev.size]
  settings = config_lib.to_dict(cfg)
  del settings["eval"]["splits"]  # Which splits run is not what one computes.
  if not examples:
    raise ValueError(f"config.eval.splits asks for {split!r}, which has no prompts "
                     "(data.validation_size=0?).")
  stage, native = METHOD_STAGES[method]

  def fn(folder):
    collect_dir = ex.stages.path("collect")
    pool = pool_lib.ConditionPool.load(os.path.join(collect_dir, "pool.json"))
    negatives_path = os.path.join(collect_dir, "negatives.json")
    negatives = None
    if os.path.exists(negatives_path):
      negatives = pool_lib.ConditionPool.load(negatives_path)
    else:
      logging.warning("%s is missing (no wrong sample scored <= %d): the 'negative' "
                      "condition is the fixed text %r.", negatives_path,
                      config.collect.negative_max_score,
                      ev.negative or evaluation.NEGATIVE[config.kind])
    results = evaluation.evaluate_policy(
        ex.policy.sampler, ex.policy.load(ex.stages.path(stage)),
        examples, conditions=list(ev.conditions),
        seeds=list(ev.seeds), pool=pool, negatives=negatives,
        no_answer=evaluation.config_no_answer(ev), kind=ev.kind,
        texts=evaluation.config_texts(ev), system=ex.system, instruction=ev.instruction,
        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
        qlambda=ex.policy.qlambda)
    if distributed.is_primary():
      evaluation.write_results(results, folder)
    return results

  record = ex.run(f"{EVAL_STAGES[split]}/{method}", fn,
                  settings=dict(stage=settings, split=split),
                  inputs=("data", "collect", stage))
  return dict({k: v for k, v in record.items() if k not in stages_lib.RUN_FIELDS},
              native=native)


def evaluate_methods(ex: Experiment, split: str) -> Dict[str, Any]:
  """Every method of ``config.methods`` evaluated on ``split`` (``evaluate_method``)."""
  return {method: evaluate_method(ex, split, method) for method in ex.config.methods}


def later_stages(ex: Experiment) -> Tuple[List[stage_workers_lib.Step],
                                          List[stage_workers_lib.Step]]:
  """``(name, run)`` of the stages after the collection, in the one-process order: the
  training stages ``config.methods`` need, and each split's evaluations."""
  config = ex.config
  training = [(name, functools.partial(TRAINING_STAGES[name], ex))
              for name in needed_stages(config)]
  evaluations = [(f"{EVAL_STAGES.get(split, split)}/{method}",
                  functools.partial(evaluate_method, ex, split, method))
                 for split in config.eval.splits for method in config.methods]
  return training, evaluations


def needed_stages(config: ml_collections.ConfigDict) -> List[str]:
  """The training stages after the collection that ``config.methods`` need, in order."""
  for method in config.methods:
    if method not in METHOD_CHAINS:
      raise KeyError(f"config.methods: unknown method {method!r}; known: "
                     f"{sorted(METHOD_CHAINS)}.")
  if config.collect.references and "grpo" in config.methods:
    raise ValueError(f"config.collect.references={config.collect.references}: FCP and "
                     "RFT would train on reference rows that GRPO cannot use; set it to "
                     "0 (every method: none) or drop 'grpo' from config.methods.")
  used = {s for m in config.methods for s in METHOD_CHAINS[m]}
  return [s for s in TRAINING_STAGES if s in used]


# Offline stages whose length the token budget sets.
BUDGETED_OFFLINE = ("offline", "rft")


def check_budget(config: ml_collections.ConfigDict):
  """Under ``budget.train_tokens`` the budgeted offline stages' ``total_steps`` is 0
  (derived); without it, it is their length and their cadences are numbers. Anything
  else names the settings."""
  tokens = config.budget.train_tokens
  for name in BUDGETED_OFFLINE:
    steps = config[name].total_steps
    if tokens and steps:
      raise ValueError(f"config.{name}.total_steps={steps} and config.budget."
                       f"train_tokens={tokens} both set the stage's length; set "
                       "total_steps=0 (steps from the budget) or train_tokens=0.")
    if not tokens and not steps:
      raise ValueError(f"config.{name}.total_steps=0 takes its steps from config.budget."
                       "train_tokens, which is 0; set one of them.")
    for key in BUDGET_CADENCE:
      if not tokens and config_lib.get(config[name], key) is None:
        raise ValueError(f"config.{name}.{key}=None follows the steps that config."
                         "budget.train_tokens gives, which is 0; set a number of steps.")


def run(config: ml_collections.ConfigDict, workdir: str, *,
        store: Optional[str] = None, worker: int = 0) -> Dict[str, Any]:
  """Runs (or resumes) every stage in ``workdir``; returns the results dict.

  ``store``: where stage folders live (default ``<workdir>/stages``); workdirs that
  share one reuse each other's stages of equal keys. ``config.stage_workers``
  processes share the stages after the collection (``fcp_jax.stage_workers``); the main
  one (``worker=0``) starts the others and alone writes the results (a helper returns
  ``{}``).
  """
  t_start = time.perf_counter()
  needed_stages(config)  # Bad methods or references fail before anything runs.
  check_budget(config)
  workers = stage_workers_lib.resolve(config.stage_workers)
  ex = Experiment(config, workdir, store=store, worker=worker)
  helpers = [] if worker else stage_workers_lib.start(config, workdir, store, workers - 1)
  try:
    pretrained_base(ex)
    prompts(ex)
    warmup(ex)
    collect(ex)
    training, evaluations = later_stages(ex)
    stage_workers_lib.run_steps(
        ex.stages, stage_workers_lib.order(training, evaluations, worker), workers)
  except BaseException:
    stage_workers_lib.finish(helpers, abort=True)
    raise
  if worker:
    return {}
  exit_codes = stage_workers_lib.finish(helpers)
  by_split = {split: evaluate_methods(ex, split) for split in config.eval.splits}
  return write_results(ex, by_split, time.perf_counter() - t_start,
                       stage_workers=dict(count=workers, exit_codes=exit_codes))


def method_budgets(ex: Experiment) -> Dict[str, Any]:
  """What each method of ``config.methods`` consumed beyond the shared warm-up (the
  warm-up: its own).

  Per method: generated ``samples``, optimizer ``updates``, ``loss_tokens`` and
  ``input_tokens`` (non-padding) trained on, ``references`` (reference solutions among
  its training rows) and wall ``seconds`` of its stages (``samples``: the sum of what
  its stages generated).
  """
  records = ex.stages.records
  out = {}
  for method in ex.config.methods:
    chain = METHOD_CHAINS[method]
    budget = dict(updates=0.0, loss_tokens=0.0, input_tokens=0.0)
    for stage in chain:
      for key, value in metrics_lib.training_budget(ex.stages.path(stage)).items():
        budget[key] += value
    references = (len(ex.train_examples) if method == "warmup" else
                  ex.collected["references"] if "collect" in chain else 0)
    out[method] = dict(budget, references=references,
                       samples=sum(records[s].get("samples", 0) for s in chain),
                       seconds=sum(records[s].get("seconds", 0.0) for s in chain))
  return out


def budget_checks(train_tokens: float, budgets: Mapping[str, Any]) -> Dict[str, Any]:
  """Each matched method's training tokens against ``budget.train_tokens`` (±10%)."""
  out = {}
  if not train_tokens:
    return out
  for method in MATCHED_METHODS:
    if method in budgets:
      ratio = budgets[method]["input_tokens"] / train_tokens
      out[f"{method}_tokens_vs_budget"] = dict(
          value=100 * ratio, rule=f"% of {train_tokens:,.0f}, within "
          f"{100 - 100 * BUDGET_TOLERANCE:.0f}-{100 + 100 * BUDGET_TOLERANCE:.0f}",
          ok=abs(ratio - 1) <= BUDGET_TOLERANCE)
  return out


def write_results(ex: Experiment, by_split: Mapping[str, Mapping[str, Any]],
                  seconds: float, stage_workers: Mapping[str, Any]) -> Dict[str, Any]:
  """``results.json``, ``results.md`` and ``plots/`` of the workdir.

  ``eval`` holds the test split's table when it was evaluated, else the first split's;
  ``split`` names it and ``by_split`` holds every evaluated split.
  """
  split = "test" if "test" in by_split else next(iter(by_split))
  evaluations = by_split[split]
  config, workdir, records = ex.config, ex.workdir, ex.stages.records
  conditions = list(config.eval.conditions)
  train_tokens = float(config.budget.train_tokens)
  budgets = method_budgets(ex)
  results = dict(
      workdir=workdir, seed=ex.seed, task=config.data.task, model=dict(config.model),
      split=split, split_sizes={k: len(v) for k, v in ex.splits.items()},
      config=config_lib.to_dict(config), stage_keys=dict(ex.stages.keys),
      budget=dict(train_tokens=train_tokens, collect=ex.collected["samples"],
                  fcp_online=online_samples(config),
                  grpo_rounds=grpo_rounds(config, ex.collected), methods=budgets),
      collect={k: v for k, v in ex.collected.items() if k != "pool_stats"},
      eval=evaluations, by_split=dict(by_split),
      checks={**effect_checks(evaluations), **budget_checks(train_tokens, budgets)},
      stage_seconds={k: v.get("seconds") for k, v in records.items()},
      stage_code={k: v.get("code") for k, v in records.items()},
      total_seconds_this_call=seconds, stage_workers=dict(stage_workers))
  if distributed.is_primary():
    config_lib.write_config(ex.config, workdir)  # The config these results are of.
    stages_lib.write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(results_markdown(results, conditions))
    results["plots"] = write_plots(workdir, results, conditions)
    stages_lib.write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Results:\n%s", results_markdown(results, conditions))
  return results


def _acc(evaluations, method, condition) -> Optional[float]:
  r = evaluations.get(method, {}).get(condition)
  return None if r is None else r["accuracy"]


def effect_checks(evaluations: Mapping[str, Any]) -> Dict[str, Any]:
  """The experiment's claims as numbers (percentage points) and pass/fail."""
  boot_pool = _acc(evaluations, "fcp_bootstrap", "pool")
  warm = _acc(evaluations, "warmup", "null")
  neg = _acc(evaluations, "fcp_bootstrap", "negative")
  out = {}
  if boot_pool is not None and warm is not None:
    gain = 100 * (boot_pool - warm)
    out["bootstrap_pool_minus_warmup_pts"] = dict(value=gain, rule="need ≥ 10",
                                                  ok=gain >= 10.0)
  if boot_pool is not None and neg is not None:
    gap = 100 * (boot_pool - neg)
    out["bootstrap_pool_minus_negative_pts"] = dict(value=gap, rule="need ≥ 20",
                                                    ok=gap >= 20.0)
  return out


def _code_line(stage_code: Mapping[str, Optional[str]]) -> str:
  """Which code (``stages.code_version``) computed the stages: one digest, or each."""
  by_code: Dict[str, List[str]] = {}
  for stage, code in stage_code.items():
    by_code.setdefault(code or "unrecorded", []).append(stage)
  if len(by_code) == 1:
    return f"Code (digest of fcp_jax's sources) of every stage: `{next(iter(by_code))}`."
  return ("**The stages come from different code** (digests of fcp_jax's sources): "
          + "; ".join(f"`{code}`: {', '.join(names)}" for code, names in by_code.items())
          + ".")


def results_markdown(results: Mapping[str, Any], conditions: Sequence[str]) -> str:
  ev = results["eval"]
  lines = [f"# FCP results ({results['task']}, seed {results['seed']}, "
           f"{results['split']} split)", "",
           f"Config: `{results['workdir']}/config.json`; stage keys: "
           + ", ".join(f"{k} `{v}`" for k, v in results["stage_keys"].items()), "",
           _code_line(results.get("stage_code", {})), "",
           f"Greedy accuracy (%) on the {results['split']} split (prompts: "
           + ", ".join(f"{k} {v}" for k, v in results["split_sizes"].items())
           + "; `eval.size` caps those evaluated) ± binomial standard error; "
           "`native` is the condition the method was trained to be used with.", "",
           "| method | native | accuracy (native) | mean length | answered % |",
           "|---|---|---|---|---|"]
  for method, res in ev.items():
    r = res.get(res["native"])
    if r is None:
      continue
    lines.append(f"| {method} | {res['native']} | {100 * r['accuracy']:.1f} ± "
                 f"{100 * r['stderr']:.1f} | {r['mean_length']:.1f} | "
                 f"{100 * r['answered']:.0f} |")
  lines += ["", "## Accuracy (%) by condition", "",
            evaluation.markdown_table({m: {c: v for c, v in r.items() if c in conditions}
                                         for m, r in ev.items()}, conditions),
            "## Checks", ""]
  for name, c in results["checks"].items():
    lines.append(f"- {name}: {c['value']:.1f} ({c['rule']}) "
                 f"{'PASS' if c['ok'] else 'FAIL'}")
  b = results["budget"]
  lines += ["", "## Budget per method (beyond the shared warm-up; the warm-up: its own)",
            "", f"FCP samples: {b['collect']:,} collected + {b['fcp_online']:,} online; "
            f"GRPO: {b['grpo_rounds']} rounds; training-token budget per method: "
            + (f"{b['train_tokens']:,.0f}." if b["train_tokens"] else "none set."), "",
            "| method | generated samples | updates | loss tokens | input tokens | "
            "references | seconds |", "|---|---|---|---|---|---|---|"]
  for method, m in b["methods"].items():
    lines.append(f"| {method} | {m['samples']:,} | {m['updates']:,.0f} | "
                 f"{m['loss_tokens']:,.0f} | {m['input_tokens']:,.0f} | "
                 f"{m['references']:,} | {m['seconds']:.0f} |")
  lines.append("")
  return "\n".join(lines) + "\n"


def write_plots(workdir: str, results: Mapping[str, Any],
                conditions: Sequence[str]) -> List[str]:
  """Accuracy per method, accuracy by condition, and training curves (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  ev = results["eval"]
  methods = list(ev)
  paths = []

  fig, ax = plt.subplots(figsize=(7, 4))
  acc = [100 * ev[m][ev[m]["native"]]["accuracy"] for m in methods]
  err = [100 * ev[m][ev[m]["native"]]["stderr"] for m in methods]
  ax.bar(methods, acc, yerr=err, capsize=4, color="tab:blue")
  ax.set_ylabel("accuracy % (native condition)")
  ax.set_title("Accuracy per method")
  paths.append(_save(fig, plt, os.path.join(out_dir, "accuracy_per_method.png")))

  fig, ax = plt.subplots(figsize=(8, 4))
  width = 0.8 / max(len(conditions), 1)
  for j, c in enumerate(conditions):
    xs = np.arange(len(methods)) + j * width
    ys = [100 * ev[m][c]["accuracy"] if c in ev[m] else 0.0 for m in methods]
    es = [100 * ev[m][c]["stderr"] if c in ev[m] else 0.0 for m in methods]
    ax.bar(xs, ys, width, yerr=es, capsize=2, label=c)
  ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
  ax.set_xticklabels(methods)
  ax.set_ylabel("accuracy %")
  ax.set_title("Accuracy by condition")
  ax.legend()
  paths.append(_save(fig, plt, os.path.join(out_dir, "accuracy_by_condition.png")))

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for stage in ("warmup", "offline_fcp", "rft", "rft_collect"):
    recs = metrics_lib.read_jsonl(os.path.join(workdir, stage, metrics_lib.JSONL_NAME))
    pts = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    if pts:
      axes[0].plot(*zip(*pts), label=stage)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss")
  axes[0].set_yscale("log")
  axes[0].legend()
  for stage in ("fcp_bootstrap", "grpo", "rft_grpo"):
    recs = metrics_lib.read_jsonl(os.path.join(workdir, stage, metrics_lib.JSONL_NAME))
    pts = [(r["step"], r["rollout/correct"]) for r in recs if "rollout/correct" in r]
    if pts:
      axes[1].plot(*zip(*pts), label=stage)
  axes[1].set_xlabel("round")
  axes[1].set_ylabel("rollout accuracy (sampling condition)")
  axes[1].legend()
  paths.append(_save(fig, plt, os.path.join(out_dir, "curves.png")))
  return paths


def _save(fig, plt, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
