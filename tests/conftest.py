"""Test settings: offline hub, one torch thread, a headless matplotlib backend."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")
# Ray (audit tests): no usage stats sent off the machine, no Ray Data usage poller
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
# a Ray call left over after a test shut its cluster down raises instead of starting a new,
# unmanaged cluster in the pytest process (ray.init() itself is unaffected)
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import sys  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
