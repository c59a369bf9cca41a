"""The README's example runs as written, and what it prints agrees with the result it describes.

Run: ``PYTHONPATH=src pytest -q tests/test_readme.py``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_reports_a_forecast_with_its_measured_change():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), scope)
    result, observed = scope["result"], scope["observed"]
    assert result.n_eval_units == 12 and result.n_update_units == 0 and result.se_total is None
    assert math.isfinite(result.delta_h1) and result.se_cond_e > 0
    assert math.isfinite(observed.delta_h) and observed.delta_h != 0 and observed.ess > 1
    assert f"forecast {result.delta_h1:+.2e}" in out.getvalue()
    assert f"measured {observed.delta_h:+.2e}" in out.getvalue()
    metrics = scope["wandb_or_print"]
    assert metrics["entropy_probe/delta_h1"] == result.delta_h1
    assert metrics["entropy_probe/measured/delta_h"] == observed.delta_h
