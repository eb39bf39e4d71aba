"""Helpers shared by the test files: the console scripts as subprocess commands."""
import shutil
import sys
from pathlib import Path

SCRIPTS = {"cgml-train": "train", "cgml-eval": "evaluate", "cgml-sample": "sample"}


def script_command(name: str) -> list[str]:
    """The console script next to this interpreter (the venv's), else on PATH, else its entry point via -c."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return [str(beside)]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"from cgml_lightning.cli import {SCRIPTS[name]}; {SCRIPTS[name]}()"]
