"""The persistent compilation cache: where it goes, that drivers turn it on, and that a
second process loads the first one's executables and computes the same values."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fcp_jax import compile_cache

# A driver that jits one program and reports its value and the cache's counters.
SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, ml_collections
    from fcp_jax import config_lib
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))

    def run(config, workdir):
      f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * config.scale)
      value = f(jnp.arange(64.0).reshape(8, 8) / 64).tolist()
      return {"value": value, "dir": jax.config.jax_compilation_cache_dir,
              "hits": events.count("/jax/compilation_cache/cache_hits")}

    print(json.dumps(config_lib.driver_main(sys.argv[1:], run)))
""")


def _run(tmp_path, cache):
  (tmp_path / "cfg.py").write_text(
      "import ml_collections\n"
      "def get_config(arg=None):\n"
      "  return ml_collections.ConfigDict({'scale': 3.0})\n")
  (tmp_path / "driver.py").write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update({compile_cache.ENV: cache, "FCP_JAX_MALLOC": "system"})
  out = subprocess.run([sys.executable, "driver.py", "--config", "cfg.py",
                        "--workdir", "wd"], cwd=tmp_path, env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("value,expected", [("off", None), ("OFF", None), ("0", None),
                                            ("", None), ("/x/y", "/x/y")])
def test_directory_from_the_environment(monkeypatch, value, expected):
  monkeypatch.setenv(compile_cache.ENV, value)
  assert compile_cache.directory() == expected


def test_default_directory_is_under_the_cache_root(monkeypatch, tmp_path):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("FCP_JAX_CACHE", str(tmp_path))
  assert compile_cache.cache_root() == str(tmp_path)
  assert compile_cache.directory() == str(tmp_path / "xla")


def test_a_second_driver_run_loads_the_first_runs_executables(tmp_path):
  cache = tmp_path / "xla"
  first = _run(tmp_path, str(cache))
  assert first["dir"] == str(cache) and first["hits"] == 0
  entries = sorted(os.listdir(cache))
  assert any(e.endswith("-cache") for e in entries), entries
  second = _run(tmp_path, str(cache))
  assert second["hits"] >= 1
  assert second["value"] == first["value"]  # Bitwise: the same executable.
  assert sorted(os.listdir(cache)) == entries  # Nothing compiled afresh.


def test_off_leaves_jax_uncached(tmp_path):
  out = _run(tmp_path, "off")
  assert out["dir"] is None and out["hits"] == 0
