"""Config loading and overrides, the string registry, and the tokenizers."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from fcp_jax import config_lib
from fcp_jax import registry
from fcp_jax.data import tokenizer as tok_lib
from fcp_jax.models import transformer as tfm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Experiment configs (configs/common.py holds their shared helpers, no get_config).
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if os.path.basename(p) != "common.py")


def test_parse_arg_big_vision_style():
  arg = config_lib.parse_arg("variant=tiny,runlocal,steps=7", variant="small",
                             runlocal=False, steps=100)
  assert (arg.variant, arg.runlocal, arg.steps) == ("tiny", True, 7)
  with pytest.raises(ValueError, match="Unknown config arg 'varient'.*variant"):
    config_lib.parse_arg("varient=tiny", variant="small")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds_with_runlocal_and_inits_abstractly(path):
  config = config_lib.load_config(f"{path}:runlocal")
  assert config.is_locked
  json.dumps(config_lib.to_dict(config))  # Plain values only.
  if "model" in config:
    model_cfg = tfm.from_config(config.model)
    shapes = jax.eval_shape(tfm.Transformer(model_cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 4), jnp.int32))
    assert jax.tree.leaves(shapes)


@pytest.mark.parametrize("path", ["configs/arith_fcp.py", "configs/gsm8k_smollm2.py"])
def test_pipeline_configs_give_each_stage_config(path):
  full = config_lib.load_config(f"{path}:runlocal")
  for stage in config_lib.STAGE_KINDS:
    assert config_lib.load_config(f"{path}:runlocal,stage={stage}") == (
        config_lib.stage_config(full, stage))
  ev = config_lib.load_config(f"{path}:runlocal,stage=eval")
  assert ev.eval.size == full.eval.size and ev.model == full.model and ev.init_from == ""
  assert ev.quant == full.warmup.quant  # Evaluation runs the warm-up's final λ.
  with pytest.raises(ValueError, match="Unknown stage 'colect'; known: warmup"):
    config_lib.load_config(f"{path}:stage=colect")


# Each shared setting and an override of it.
SHARED_OVERRIDES = [
    ("data.task", "'chain_sum(min_terms=2, max_terms=2)'"),
    ("feedback", "'critic(noise=0.25, seed=3)'"),
    ("seed", "7"),
    ("data.task_seed", "7"),
    ("model.weight_quant", "'twn'"),
    ("data.system", "'Be brief.'"),
    ("kind", "'user'"),
    ("tokenizer", "'/somewhere/tokenizer.json'"),
]


@pytest.mark.parametrize("shared,text", SHARED_OVERRIDES,
                         ids=[s for s, _ in SHARED_OVERRIDES])
def test_a_shared_override_reaches_every_stage(shared, text):
  config = config_lib.load_config(f"{REPO}/configs/arith_fcp.py:runlocal")
  config_lib.apply_overrides(config, [f"{shared}={text}"])
  want = eval(text)  # pylint: disable=eval-used
  readers = set()
  for stage, kind in config_lib.STAGE_KINDS.items():
    resolved = config_lib.stage_config(config, stage)
    for key, source in config_lib.DERIVED[kind].items():
      if shared == source or shared.startswith(source + "."):
        node = resolved
        for part in (key + shared[len(source):]).split("."):
          node = node[part]
        assert node == want, (stage, key, node)
        readers.add(stage)
  assert len(readers) >= 3, readers  # Every shared setting reaches several stages.


def test_a_stage_override_of_a_shared_setting_names_both_keys(tmp_path):
  path = f"{REPO}/configs/arith_fcp.py:runlocal"
  for key, shared in (("bootstrap.online.task", "data.task"),
                      ("warmup.model.weight_quant", "model.weight_quant"),
                      ("grpo.online.feedback", "feedback"), ("rft.seed", "seed"),
                      ("eval.kind", "kind")):
    with pytest.raises(KeyError, match=rf"config\.{key} is derived from the shared "
                                       rf"config\.{shared}"):
      config_lib.config_from_argv(["--config", path, f"--config.{key}=1"])
  # A stage section that holds a shared key itself (a hand-made config) is refused too.
  config = config_lib.load_config(path)
  with config.warmup.unlocked():
    config.warmup.seed = 3
  with pytest.raises(ValueError, match=r"config\.warmup\.seed is set, but it is derived "
                                       r"from the shared config\.seed"):
    config_lib.stage_config(config, "warmup")


def test_task_seed_follows_the_seed_unless_set():
  config = config_lib.load_config(f"{REPO}/configs/arith_fcp.py:runlocal,seed=4")
  assert config.data.task_seed is None
  assert config_lib.stage_config(config, "grpo").online.task_seed == 4
  config_lib.apply_overrides(config, ["data.task_seed=9"])
  assert config_lib.stage_config(config, "eval").eval.task_seed == 9


def test_boolean_args_and_overrides_are_strict(tmp_path):
  path = f"{REPO}/configs/arith_fcp.py"
  assert not config_lib.load_config(f"{path}:runlocal,ternary=false").model.act_quant != (
      "none")
  assert config_lib.load_config(f"{path}:runlocal,ternary=Yes").model.weight_quant == (
      "absmean")
  with pytest.raises(ValueError, match=r"'ternary'.*'Ture' is not a boolean.*'false'"):
    config_lib.load_config(f"{path}:runlocal,ternary=Ture")
  with pytest.raises(ValueError, match=r"Config arg seed='x' is not a int"):
    config_lib.load_config(f"{path}:runlocal,seed=x")
  for override, what in (("warmup.total_steps=2.5", "expected a int, got '2.5'"),
                         ("warmup.total_steps='7'", "expected a int, got \"'7'\""),
                         ("warmup.total_steps=True", "expected a int"),
                         ("eval.seeds=3", "expected a tuple, got '3'"),
                         ("warmup.optim.lr=fast", "cannot parse 'fast' as float"),
                         ("warmup.plots=Ture", "'Ture' is not a boolean")):
    with pytest.raises(ValueError, match=what):
      config_lib.config_from_argv(["--config", f"{path}:runlocal",
                                   f"--config.{override}"])
  config, _ = config_lib.config_from_argv(
      ["--config", f"{path}:runlocal", "--config.warmup.optim.lr=1", "--config.eval.seeds=[3]",
       "--config.warmup.plots=false"])
  assert config.warmup.optim.lr == 1.0 and isinstance(config.warmup.optim.lr, float)
  assert config.eval.seeds == (3,) and config.warmup.plots is False


def test_overrides_types_and_nearest_keys(tmp_path):
  cfg_file = tmp_path / "c.py"
  cfg_file.write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup=10, name='adamw'))\n"
      "  c.seed = 0\n"
      "  c.layers = (1, 2)\n"
      "  return c\n")
  config, flags = config_lib.config_from_argv(
      ["--config", str(cfg_file), "--config.optim.lr=5e-4", "--config.optim.warmup", "3",
       "--config.layers=[3,4]", "--workdir=/tmp/x"])
  assert config.optim.lr == 5e-4 and config.optim.warmup == 3 and config.layers == (3, 4)
  assert flags == {"workdir": "/tmp/x"}
  with pytest.raises(KeyError, match=r"optim\.lr"):
    config_lib.config_from_argv(["--config", str(cfg_file), "--config.optim.lrr=1"])
  with pytest.raises(ValueError, match="optim.warmup"):
    config_lib.config_from_argv(["--config", str(cfg_file), "--config.optim.warmup=abc"])
  path = config_lib.write_config(config, str(tmp_path / "wd"))
  assert json.load(open(path))["optim"]["lr"] == 5e-4


def test_registry_parses_arguments_and_lists_names_on_failure():
  reg = registry.Registry("test widget")

  @reg.register("scale")
  def scale(x, *, by=2.0, name="s"):
    return x * by, name

  assert reg.build("scale(by=3.0, name='q')", 2.0) == (6.0, "q")
  assert reg.get("scale")(1.0) == (2.0, "s")
  with pytest.raises(KeyError, match="Did you mean 'scale'.*Registered: scale"):
    reg.get("scal(by=1)")
  with pytest.raises(ValueError, match="literals"):
    reg.get("scale(by=foo)")
  with pytest.raises(KeyError, match="already registered"):
    reg.register("scale")(lambda: None)


def test_char_tokenizer_round_trip_and_specials():
  tok = tok_lib.CharTokenizer()
  text = "<|im_start|>user\n<EF>good</EF>12+7=?<|im_end|>"
  ids = tok.encode(text)
  assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id
  assert tok.ef_open_id in ids and tok.ef_close_id in ids
  assert tok.decode(ids) == text
  assert tok.decode(ids, skip_special=True) == "user\ngood12+7=?"
  assert len(tok.encode("123")) == 3  # one token per digit
  assert tok.encode("é") == [tok.unk_id]
  assert tok.pad_id == 0 and tok.im_end_id in tok.eos_ids
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_hf_tokenizer_adds_missing_specials():
  vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
  hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = tok_lib.HFTokenizer(hf)
  assert set(tok.added_tokens) >= {tok_lib.EF_OPEN, tok_lib.EF_CLOSE, tok_lib.IM_END}
  assert tok.vocab_size == 4 + len(tok.added_tokens)
  ids = tok.encode("<EF>ab</EF>")
  assert ids == [tok.ef_open_id, 3, tok.ef_close_id]
  assert tok.decode(ids, skip_special=True) == "ab"
  with pytest.raises(KeyError, match="not in the tokenizer"):
    tok.token_to_id("zzz")
