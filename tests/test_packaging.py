"""pyproject.toml and requirements.txt must name the same dependencies (pip install . vs make setup)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_dependencies_equal_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(project["dependencies"]) == sorted(x for x in lines if x and not x.startswith("#"))


def test_console_commands_point_at_callables():
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
