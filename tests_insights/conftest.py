"""Captum Insights tests: they run in .venv-insights (captum 0.8), made by `make test-insights`.

Outside that environment (captum 0.9 has no Insights) they are skipped, unless
CAPTUM_VLM_INSIGHTS_ENV=1 says this is the Insights environment: then a failed import fails.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # numerics

if not os.environ.get("CAPTUM_VLM_INSIGHTS_ENV"):
    pytest.importorskip("captum.insights", reason="Captum Insights needs captum 0.8: run `make test-insights`")
