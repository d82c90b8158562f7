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
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DATA_USAGE_DISABLED := 1

.PHONY: setup browser demo test clean notebooks insights-setup test-insights

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/captum-vlm demo --out demo-output

# The HTML report test drives Debian's Chromium (no browser download): install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) || \
		echo "warning: could not install chromium; the report browser test will be skipped"

# Ray's local-cluster tests run in a pytest process of their own: three full runs of 2026-12-02
# ended with exit code 1 and no summary minutes after them (inside test_conventions), which a Ray
# client left in the process would explain (cause not found); run apart, every run passed.
test: setup browser
	$(PY) -m ruff check captum_vlm tests tests_insights benchmarks tutorials
	$(PY) -m pytest -q --ignore=tests/test_audit_ray.py
	$(PY) -m pytest -q tests/test_audit_ray.py
	$(MAKE) test-insights

# Re-execute the tutorial notebooks in place (outputs and the hash of their code cells).
notebooks: setup
	$(PY) tutorials/run_notebooks.py

# Captum Insights needs captum 0.8 (numpy < 2): a second environment, tested on its own.
INSIGHTS_VENV ?= .venv-insights
IPY := $(INSIGHTS_VENV)/bin/python
insights-setup: $(INSIGHTS_VENV)/.installed

$(INSIGHTS_VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(INSIGHTS_VENV)
	$(IPY) -m pip install -q --upgrade pip
	$(IPY) -m pip install -q torch==2.13.0
	$(IPY) -m pip install -q -e ".[insights]" pytest
	touch $@

test-insights: insights-setup
	CAPTUM_VLM_INSIGHTS_ENV=1 $(IPY) -m pytest -q tests_insights

clean:
	rm -rf $(VENV) $(INSIGHTS_VENV) demo-output *.egg-info
