"""The tutorials still run against the current API and write what they say they write."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


@pytest.mark.parametrize("script, written", [("quickstart.py", "quickstart.html"), ("vqa_grounding.py", "vqa.html")])
def test_tutorial_runs(script, written, capsys):
    target = TUTORIALS / "out" / written
    target.unlink(missing_ok=True)
    runpy.run_path(str(TUTORIALS / script), run_name="__main__")
    assert target.stat().st_size > 0
    assert f"wrote {target}" in capsys.readouterr().out
