"""The README's Python example runs as written (shrunk: fewer samples and one epoch), and its two shell commands
are what they say: set up + train the default, then the tests in that venv, writing inside the checkout only."""
import os
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


def readme_commands() -> list[str]:
    """The two commands of the README's first shell block (comments left out)."""
    if not README.is_file():
        pytest.skip("README.md not next to the tests (installed elsewhere)")
    block = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_first_command_sets_up_and_trains_the_default(tmp_path):
    import shlex

    from tests.helpers import compose_job

    setup, _ = readme_commands()
    steps = [shlex.split(part) for part in setup.split("&&")]
    assert steps[0] == ["python3", "-m", "venv", ".venv"]
    assert steps[1] == [".venv/bin/pip", "install", "torch==2.13.0"]
    assert steps[2] == [".venv/bin/pip", "install", "-e", ".[dev]"]
    assert steps[3][0] == ".venv/bin/cgml-train"
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'TORCH_VERSION="2.13.0"' in ci                               # CI installs the same torch
    cfg = compose_job(tmp_path, *steps[3][1:])
    assert cfg.data._target_.endswith("DigitsDataModule") and cfg.task_name == "digits_completion"


def test_readme_test_command_reuses_the_venv_and_writes_inside_the_checkout(tmp_path):
    _, tests = readme_commands()
    assert tests.split() == [".venv/bin/python", "-m", "pytest", "-q"]  # no second venv, no apt-get, no sudo
    root = README.parent.resolve()
    assert tmp_path.resolve().is_relative_to(root), tmp_path           # pytest's temporary folders
    for name in ("MPLCONFIGDIR", "WANDB_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "JUPYTER_RUNTIME_DIR", "TORCH_HOME"):
        assert Path(os.environ[name]).resolve().is_relative_to(root), name
