"""The end-to-end FCP experiment: warm-up → collect → offline FCP → bootstrap → evaluate.

    python -m fcp_jax.pipeline --config configs/arith_fcp.py --workdir runs/x

or ``results = pipeline.run(config, workdir)``. Stages, each in its own subfolder of the
workdir, each skipped on re-run once its ``stage_done.json`` exists (a stage that was
interrupted resumes from its own checkpoints):

0. ``base/`` (only with ``config.pretrained``, a ``checkpoints.PRETRAINED`` spec such
   as ``"smollm2(pad_to_multiple=128)"``): the pretrained params as a checkpoint and its
   tokenizer; the warm-up starts from it and every stage uses that tokenizer
   (``""``, the default, trains from scratch with ``config.tokenizer``);
1. ``data/``: train and held-out eval prompts of ``config.data.task``;
2. ``warmup/``: SFT on reference solutions under the null condition ``<EF></EF>``
   (``data.direct_fraction`` of them answer-only; ``data.warmup_conditions`` of the rows
   under a feedback text drawn at random from ``condition_bank``, independent of the
   response, so the policy has seen feedback text before FCP gives it a meaning);
3. ``collect/``: ``k`` samples per prompt from the warm-up (T=1, null condition),
   feedback from the cached env, prompts with mixed outcomes only, ``pairs`` correct and
   ``pairs`` incorrect responses each (``pairs=0``: all of them), plus the warm-up's
   references of ``references`` further prompts with the env's feedback on them → the
   triples dataset, the positive pool (``pool.json``: score ≥ ``pool_min_score`` among
   the samples, see ``feedback/pool.py``) and its mirror image, the worst verdicts
   (``negatives.json``: wrong and score ≤ ``negative_max_score``), which evaluation
   draws its fully negative condition from;
4. ``offline_fcp/``: NLL of ``response | <EF>c</EF> question`` on the triples;
5. ``fcp_bootstrap/``: online rounds from offline FCP (``fcp_jax.bootstrap``);
6. ``rft/``: baseline, fine-tunes the warm-up on every correct sample (under the null
   condition) of the collection plus an equal-budget second collection;
7. ``grpo/``: baseline, GRPO from the warm-up with the score/10 reward for as many
   rounds as make the same number of generated samples as FCP used;
8. ``eval/<method>/``: greedy accuracy under each condition (``fcp_jax.evaluate``).

Finally ``results.json``, ``results.md`` and ``plots/`` (accuracy per method, accuracy
by condition, training curves) are written in the workdir.
"""

import copy
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from fcp_jax import bootstrap as bootstrap_lib
from fcp_jax import config_lib
from fcp_jax import evaluate as evaluate_lib
from fcp_jax import train as train_lib
from fcp_jax.data import chat
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.data import tfds_builders
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.feedback import pool as pool_lib
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import checkpoint as checkpoint_lib
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib

DONE = "stage_done.json"
TFDS_DIR = "tfds"
BANK_PROMPTS = 1024  # Prompts whose made-up responses give the warm-up's condition bank.
BASE = "base"  # Stage folder of the pretrained model (``config.pretrained``).
# Method -> (stage folder holding its final params, condition it is meant to be used with).
METHOD_STAGES = {"warmup": ("warmup", "null"), "offline_fcp": ("offline_fcp", "pool"),
                 "fcp_bootstrap": ("fcp_bootstrap", "pool"), "rft": ("rft", "null"),
                 "grpo": ("grpo", "null")}


# ---------------------------------------------------------------------------------------
# Stage bookkeeping.
# ---------------------------------------------------------------------------------------


class Stages:
  """Runs each stage once: a stage with ``<dir>/stage_done.json`` returns its record."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.records: Dict[str, Dict[str, Any]] = {}

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def run(self, name: str, fn: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    folder = self.path(name)
    done = os.path.join(folder, DONE)
    if os.path.exists(done):
      with open(done) as f:
        record = json.load(f)
      logging.info("Stage %s: complete, skipped.", name)
    else:
      logging.info("Stage %s: running.", name)
      os.makedirs(folder, exist_ok=True)
      t0 = time.perf_counter()
      record = fn(folder)
      record = dict(_jsonable(record), seconds=time.perf_counter() - t0)
      _write_json(done, record)
    self.records[name] = record
    return record


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def _write_json(path: str, obj: Any):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=2)
  os.replace(tmp, path)


def with_pretrained_base(config: ml_collections.ConfigDict, base_dir: str
                         ) -> ml_collections.ConfigDict:
  """The pipeline config with the warm-up's ``init_from`` and every ``tokenizer`` at
  ``base_dir`` (the ``base/`` stage folder: params checkpoint + ``tokenizer.json``)."""
  if config.warmup.init_from:
    raise ValueError(f"config.pretrained={config.pretrained!r} and config.warmup."
                     f"init_from={config.warmup.init_from!r} are both set; keep one.")
  tok = os.path.join(base_dir, train_lib.TOKENIZER_FILE)
  updates = {"tokenizer": tok, "warmup.init_from": base_dir}
  updates.update({f"{name}.tokenizer": tok for name in config_lib.PIPELINE_STAGES
                  if name in config})
  return stage_config(config, **updates)


def stage_config(cfg: ml_collections.ConfigDict, **updates) -> ml_collections.ConfigDict:
  """A copy of a stage config with dotted-key updates (``{"data.data_dir": ...}``)."""
  out = copy.deepcopy(cfg)
  with out.unlocked():
    for key, value in updates.items():
      node = out
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return out


# ---------------------------------------------------------------------------------------
# Policies: params of a finished stage, a sampler, the deployed λ.
# ---------------------------------------------------------------------------------------


class Policy:
  """The model shared by every stage, with helpers to load and sample a stage's params."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.tok = train_lib.build_tokenizer(config.tokenizer)
    self.model, self.model_cfg = state_lib.build_model(config.warmup.model)
    train_lib.check_vocab(self.tok, self.model_cfg)
    self.sampler = sampler_lib.Sampler(self.model, self.tok, prompt_bucket=32)
    self.abstract = jax.eval_shape(lambda: nn.unbox(state_lib.init_boxed_params(
        self.model, jax.random.PRNGKey(0))))
    quant = config.warmup.quant
    self.qlambda = step_lib.make_qlambda_fn(self.model_cfg, quant)(
        step_lib.final_qlambda_step(quant, self.model_cfg.num_layers))

  def load(self, run_dir: str) -> Any:
    return checkpoint_lib.restore_params(run_dir, self.abstract)


def sample_with_feedback(policy: Policy, params: Any, examples: Sequence[tasks_lib.Example],
                         *, num_samples: int, env, rng: jax.Array, method: str,
                         max_new_tokens: int, batch_prompts: int, instruction: str,
                         system: Optional[str], condition: Optional[str] = ""
                         ) -> List[Dict[str, Any]]:
  """``num_samples`` responses per example under one condition, with feedback."""
  out_rows = []
  progress = metrics_lib.Progress(len(examples))
  for start in range(0, len(examples), batch_prompts):
    chunk = examples[start:start + batch_prompts]
    questions = [tasks_lib.format_question(e, instruction) for e in chunk]
    prompts = [chat.encode_prompt(policy.tok, q, condition, system=system)
               for q in questions]
    out = policy.sampler.sample(params, prompts, jax.random.fold_in(rng, start),
                                max_new_tokens=max_new_tokens, method=method,
                                num_samples=num_samples, qlambda=policy.qlambda)
    rows = [(chunk[i // num_samples], questions[i // num_samples], out.text[i])
            for i in range(len(out.text))]
    feedback = env.feedback([(e, t) for e, _, t in rows])
    for (e, q, t), fb in zip(rows, feedback):
      out_rows.append(dict(example=e, question=q, response=t, feedback=fb))
    progress.add_tokens(int(np.sum(out.lengths)))
    speed = progress.report(start + len(chunk))
    logging.info("sampled %d/%d prompts | %s tok/s | ETA %s", start + len(chunk),
                 len(examples), f"{speed['tokens_per_s']:,.0f}",
                 metrics_lib._duration(speed["eta_s"]))  # pylint: disable=protected-access
  return out_rows


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
  feedback = env.feedback([(e, r["response"]) for e, r in picked])
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
  bank = sorted({fb.condition(kind) for fb in env.feedback(queries)} - {""})
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
  """Seeded train/eval split of dataset records (the eval split has at least one)."""
  order = np.random.default_rng([seed, 5]).permutation(len(records))
  n_eval = max(1, int(round(eval_fraction * len(records))))
  return {"train": [records[i] for i in order[n_eval:]],
          "eval": [records[i] for i in order[:n_eval]]}


# ---------------------------------------------------------------------------------------
# The recipe.
# ---------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) every stage in ``workdir``; returns the results dict."""
  t_start = time.perf_counter()
  config_lib.write_config(config, workdir)
  stages = Stages(workdir)
  tfds_dir = os.path.join(os.path.abspath(workdir), TFDS_DIR)
  seed = int(config.seed)
  data = config.data
  system = data.system or None
  kind = config.kind

  # -------------------------------------------------------------------------------------
  # 0. Pretrained base (``config.pretrained``): imported once as a checkpoint + tokenizer;
  #    the warm-up starts from it and every stage uses its tokenizer.
  # -------------------------------------------------------------------------------------
  if config.get("pretrained"):
    stages.run(BASE, lambda folder: train_lib.write_pretrained_base(
        config.pretrained, config.warmup.model, folder))
    config = with_pretrained_base(config, os.path.abspath(stages.path(BASE)))
  policy = Policy(config)

  # -------------------------------------------------------------------------------------
  # 1. Prompts.
  # -------------------------------------------------------------------------------------
  def make_data(folder):
    train = tasks_lib.TASKS.build(data.task, split="train", size=data.train_size,
                                  seed=data.task_seed)
    held_out = tasks_lib.TASKS.build(data.task, split="eval", size=data.eval_size,
                                     seed=data.task_seed)
    for name, exs in (("train", train), ("eval", held_out)):
      with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(e.to_dict()) + "\n" for e in exs)
    return dict(train=len(train), eval=len(held_out))

  stages.run("data", make_data)

  def read_examples(name):
    with open(os.path.join(stages.path("data"), f"{name}.jsonl")) as f:
      return [tasks_lib.Example.from_dict(json.loads(line)) for line in f]

  train_examples, eval_examples = read_examples("train"), read_examples("eval")

  # -------------------------------------------------------------------------------------
  # 2. SFT warm-up under the null condition.
  # -------------------------------------------------------------------------------------
  def warmup(folder):
    bank = []
    if data.warmup_conditions > 0:
      env = bootstrap_lib.build_feedback_env(config.feedback, folder)
      bank = condition_bank(env, train_examples[:BANK_PROMPTS], kind=kind, seed=seed)
    records = warmup_records(train_examples, instruction=data.instruction, kind=kind,
                             seed=seed, direct_fraction=data.direct_fraction,
                             condition_fraction=data.warmup_conditions, bank=bank)
    build_dataset(tfds_builders.TRIPLES, split_records(records, 0.05, seed), tfds_dir,
                  config.warmup.data.name)
    cfg = stage_config(config.warmup, **{"data.data_dir": tfds_dir})
    return train_lib.run(cfg, folder)

  stages.run("warmup", warmup)

  # -------------------------------------------------------------------------------------
  # 3. Collect samples + feedback; keep mixed prompts; build triples and the pool.
  # -------------------------------------------------------------------------------------
  col = config.collect
  collect_prompts = train_examples[:col.prompts]

  def collect(folder):
    env = bootstrap_lib.build_feedback_env(config.feedback, folder)
    rows = sample_with_feedback(
        policy, policy.load(stages.path("warmup")), collect_prompts,
        num_samples=col.num_samples, env=env, rng=jax.random.PRNGKey(seed + 101),
        method=col.sampling, max_new_tokens=col.max_new_tokens,
        batch_prompts=col.batch_prompts, instruction=data.instruction, system=system)
    kept, stats = select_pairs(rows, col.num_samples, col.pairs, seed)
    if not kept:
      raise RuntimeError(f"No prompt had mixed outcomes ({stats}); the warm-up is too "
                         "weak or too strong for this task.")
    references = reference_rows(env, train_examples, col.prompts, col.references,
                                instruction=data.instruction, kind=kind, seed=seed,
                                direct_fraction=data.direct_fraction)
    records = [tfds_builders.triple_record(r["example"], r["question"], r["response"],
                                           r["feedback"], kind) for r in kept + references]
    build_dataset(tfds_builders.TRIPLES, split_records(records, col.eval_fraction, seed),
                  tfds_dir, config.offline.data.name)
    feedback = [r["feedback"] for r in rows]
    pool = pool_lib.ConditionPool.build(feedback, kind=kind, min_score=col.pool_min_score,
                                        require_correct=col.pool_require_correct)
    pool.save(os.path.join(folder, "pool.json"))
    try:
      negatives = pool_lib.ConditionPool.build(
          feedback, kind=kind, min_score=0, max_score=col.negative_max_score,
          require_incorrect=True)
      negatives.save(os.path.join(folder, "negatives.json"))
    except pool_lib.EmptyPoolError:  # No wrong sample scored that low (warned below).
      negatives = ()
    # Correct samples for the RFT baseline (its second, equal-budget share comes later).
    _write_json(os.path.join(folder, "correct.json"),
                [dict(uid=r["example"].uid, question=r["question"], response=r["response"],
                      feedback=r["feedback"].to_dict()) for r in rows + references
                 if r["feedback"].correct and is_plain(r["response"])])
    return dict(stats, samples=len(rows), triples=len(records), pool=len(pool),
                negatives=len(negatives), references=len(references),
                pool_stats=pool.stats, sample_accuracy=float(np.mean(
                    [fb.correct for fb in feedback])),
                feedback_misses=env.misses, feedback_hits=env.hits)

  collected = stages.run("collect", collect)
  pool_path = os.path.join(stages.path("collect"), "pool.json")
  pool = pool_lib.ConditionPool.load(pool_path)
  negatives_path = os.path.join(stages.path("collect"), "negatives.json")
  negatives = None
  if os.path.exists(negatives_path):
    negatives = pool_lib.ConditionPool.load(negatives_path)
  else:
    logging.warning("%s is missing (no wrong sample scored <= %d, or a run collected "
                    "before it existed): the 'negative' condition is the fixed text %r.",
                    negatives_path, col.negative_max_score,
                    config.eval.negative or evaluate_lib.NEGATIVE[kind])

  # -------------------------------------------------------------------------------------
  # 4. Offline FCP from the warm-up.
  # -------------------------------------------------------------------------------------
  stages.run("offline_fcp", lambda folder: train_lib.run(stage_config(
      config.offline, **{"data.data_dir": tfds_dir,
                         "init_from": os.path.abspath(stages.path("warmup"))}), folder))

  # -------------------------------------------------------------------------------------
  # 5. Online bootstrapping from offline FCP.
  # -------------------------------------------------------------------------------------
  boot = config.bootstrap.online
  online_samples = boot.rounds * boot.prompts_per_step * boot.num_samples
  stages.run("fcp_bootstrap", lambda folder: bootstrap_lib.run(stage_config(
      config.bootstrap, **{"init_from": os.path.abspath(stages.path("offline_fcp")),
                           "online.pool": os.path.abspath(pool_path)}), folder))

  # -------------------------------------------------------------------------------------
  # 6. RFT baseline: all correct samples of the collection plus an equal online share.
  # -------------------------------------------------------------------------------------
  budget = collected["samples"] + online_samples

  def rft(folder):
    env = bootstrap_lib.build_feedback_env(config.feedback, folder)
    per_prompt = boot.num_samples
    extra_prompts = [train_examples[i % len(train_examples)] for i in range(
        col.prompts, col.prompts + online_samples // per_prompt)]
    extra = sample_with_feedback(
        policy, policy.load(stages.path("warmup")), extra_prompts,
        num_samples=per_prompt, env=env, rng=jax.random.PRNGKey(seed + 202),
        method=col.sampling, max_new_tokens=col.max_new_tokens,
        batch_prompts=col.batch_prompts, instruction=data.instruction, system=system)
    with open(os.path.join(stages.path("collect"), "correct.json")) as f:
      correct = json.load(f)
    correct += [dict(uid=r["example"].uid, question=r["question"], response=r["response"],
                     feedback=r["feedback"].to_dict()) for r in extra
                if r["feedback"].correct and is_plain(r["response"])]
    unique = list({(r["question"], r["response"]): r for r in correct}.values())
    records = [dict(r, kind=kind) for r in unique]
    build_dataset(tfds_builders.TRIPLES, split_records(records, 0.05, seed), tfds_dir,
                  config.rft.data.name)
    summary = train_lib.run(stage_config(
        config.rft, **{"data.data_dir": tfds_dir,
                       "init_from": os.path.abspath(stages.path("warmup"))}), folder)
    return dict(summary, samples=collected["samples"] + len(extra),
                correct_unique=len(unique))

  stages.run("rft", rft)

  # -------------------------------------------------------------------------------------
  # 7. GRPO baseline from the warm-up with the same number of generated samples.
  # -------------------------------------------------------------------------------------
  grpo_online = config.grpo.online
  per_round = grpo_online.prompts_per_step * grpo_online.num_samples
  grpo_rounds = grpo_online.rounds or max(1, math.ceil(budget / per_round))
  stages.run("grpo", lambda folder: dict(bootstrap_lib.run(stage_config(
      config.grpo, **{"init_from": os.path.abspath(stages.path("warmup")),
                      "online.rounds": grpo_rounds}), folder)))

  # -------------------------------------------------------------------------------------
  # 8. Evaluation under conditions.
  # -------------------------------------------------------------------------------------
  ev = config.eval
  no_answer = evaluate_lib.config_no_answer(ev)
  evaluations = {}
  for method in config.methods:
    if method not in METHOD_STAGES:
      raise KeyError(f"config.methods: unknown method {method!r}; known: "
                     f"{sorted(METHOD_STAGES)}.")
    folder_name, native = METHOD_STAGES[method]

    def evaluate(folder, folder_name=folder_name):
      results = evaluate_lib.evaluate_policy(
          policy.sampler, policy.load(stages.path(folder_name)), eval_examples[:ev.size],
          conditions=list(ev.conditions), seeds=list(ev.seeds), pool=pool,
          negatives=negatives, no_answer=no_answer, kind=kind,
          texts=dict(negative=ev.negative, positive=ev.positive), system=system,
          instruction=ev.instruction, max_new_tokens=ev.max_new_tokens,
          batch_size=ev.batch_size, qlambda=policy.qlambda)
      evaluate_lib.write_results(results, folder)
      return results

    record = stages.run(os.path.join("eval", method), evaluate)
    evaluations[method] = {k: v for k, v in record.items() if k != "seconds"}
    evaluations[method]["native"] = native

  # -------------------------------------------------------------------------------------
  # Results: table, checks, plots.
  # -------------------------------------------------------------------------------------
  results = dict(
      workdir=workdir, seed=seed, task=data.task, model=dict(config.warmup.model),
      budget=dict(collect=collected["samples"], fcp_online=online_samples,
                  fcp_total=budget, rft_total=stages.records["rft"].get("samples"),
                  grpo_total=grpo_rounds * per_round, grpo_rounds=grpo_rounds),
      collect={k: v for k, v in collected.items() if k != "pool_stats"},
      eval=evaluations, checks=effect_checks(evaluations),
      stage_seconds={k: v.get("seconds") for k, v in stages.records.items()},
      total_seconds_this_call=time.perf_counter() - t_start)
  _write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(results, list(ev.conditions)))
  results["plots"] = write_plots(workdir, results, list(ev.conditions))
  _write_json(os.path.join(workdir, "results.json"), results)
  logging.info("Results:\n%s", results_markdown(results, list(ev.conditions)))
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
    out["bootstrap_pool_minus_warmup_pts"] = dict(value=gain, need=10.0, ok=gain >= 10.0)
  if boot_pool is not None and neg is not None:
    gap = 100 * (boot_pool - neg)
    out["bootstrap_pool_minus_negative_pts"] = dict(value=gap, need=20.0, ok=gap >= 20.0)
  return out


def results_markdown(results: Mapping[str, Any], conditions: Sequence[str]) -> str:
  ev = results["eval"]
  lines = [f"# FCP results ({results['task']}, seed {results['seed']})", "",
           "Greedy accuracy (%) on held-out prompts ± binomial standard error; "
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
            evaluate_lib.markdown_table({m: {c: v for c, v in r.items() if c in conditions}
                                         for m, r in ev.items()}, conditions),
            "## Checks", ""]
  for name, c in results["checks"].items():
    lines.append(f"- {name}: {c['value']:.1f} (need ≥ {c['need']:.0f}) "
                 f"{'PASS' if c['ok'] else 'FAIL'}")
  b = results["budget"]
  lines += ["", "## Generated samples per method", "",
            f"- FCP: {b['collect']} collected + {b['fcp_online']} online = "
            f"{b['fcp_total']}",
            f"- RFT: {b['rft_total']}", f"- GRPO: {b['grpo_total']} "
            f"({b['grpo_rounds']} rounds)", ""]
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
  for stage in ("warmup", "offline_fcp", "rft"):
    recs = metrics_lib.read_jsonl(os.path.join(workdir, stage, metrics_lib.JSONL_NAME))
    pts = [(r["step"], r["train/loss"]) for r in recs if "train/loss" in r]
    if pts:
      axes[0].plot(*zip(*pts), label=stage)
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("train loss")
  axes[0].set_yscale("log")
  axes[0].legend()
  for stage in ("fcp_bootstrap", "grpo"):
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


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """``--config spec --workdir DIR [--config.k=v ...]``."""
  return config_lib.driver_main(argv, run)


if __name__ == "__main__":
  main(sys.argv[1:])
