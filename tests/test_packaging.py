"""The package ships what its metadata promises: the ``py.typed`` marker (PEP 561) that
the ``Typing :: Typed`` classifier announces, so type checkers read our annotations."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_is_part_of_the_package() -> None:
    marker = importlib.resources.files("asyncsession").joinpath("py.typed")
    assert marker.is_file()
    assert "Typing :: Typed" in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_the_built_wheel_contains_py_typed(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="building the wheel offline needs hatchling")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("asyncsession-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "asyncsession/py.typed" in names
    assert "asyncsession/__init__.py" in names
    (license_file,) = (n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    with zipfile.ZipFile(wheel) as archive:
        assert b"MIT License" in archive.read(license_file)
        (metadata_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    # coredis 6.0-6.8 lack what the Redis store uses (see stores/redis.py _COREDIS_OLDEST)
    assert "Requires-Dist: coredis<7,>=6.9; extra == 'redis'" in metadata
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)
