# Two commands do everything on a fresh clone:
#   make demo   set up .venv and explain the bundled zoo model on a bundled scene
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE
export OMP_NUM_THREADS ?= 1
export MPLBACKEND := Agg

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/captum-vlm demo --out demo-output

test: setup
	$(PY) -m ruff check captum_vlm tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-output *.egg-info
