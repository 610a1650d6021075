"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.slow
def test_readme_python_example_runs() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has a Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
