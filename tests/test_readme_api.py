"""The README's Python API example runs as written (on the tiny model, with fewer steps and items)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_block_runs(tmp_path):
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    line = 'MODEL, STEPS, TEST_ITEMS, work = "smollm2-135m", 20, 100, Path("api-demo")'
    assert line in code
    script = tmp_path / "api.py"
    script.write_text(code.replace(line, 'MODEL, STEPS, TEST_ITEMS, work = "tiny-llama", 2, 8, Path("api-demo")'))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"LoRA-CR changed \d+\.\d\d% of the parameters", r.stdout)
    assert re.search(r"^base .*'n': 8\}$", r.stdout, re.M) and re.search(r"^fused .*'n': 8\}$", r.stdout, re.M)
    for domain in ("stem", "humanities"):  # every artifact of the loop is where the example says
        assert (tmp_path / "api-demo" / domain / "pruned" / "plan.json").is_file()
        assert (tmp_path / "api-demo" / domain / "recovered" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "api-demo" / "fused" / "adapter_model.safetensors").is_file()
