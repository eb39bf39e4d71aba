"""The README's Python example runs as written (shrunk: fewer samples and one epoch)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # the example's Trainer writes checkpoints/ into the working dir
    if not README.is_file():
        pytest.skip("README.md not next to the tests (installed elsewhere)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 16
    for big, small in (("num_samples=20000", "num_samples=512"), ("max_epochs=20", "max_epochs=1")):
        assert big in code
        code = code.replace(big, small)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["samples"].shape) == (100, 20, 3)
    assert tuple(scope["guided"].shape) == (100, 20, 3)
