"""The package ships what its metadata promises: the ``py.typed`` marker (PEP 561) that
the ``Typing :: Typed`` classifier announces, so type checkers read our annotations; and
the README's table of contents matches its sections."""

from __future__ import annotations

import importlib.resources
import re
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


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_contents_lists_every_section_with_its_anchor() -> None:
    """The README's Contents names every section (## and ###) in order, and every link
    to a section of the README (#anchor) leads to one."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^#{2,3} (.+)$", text, re.MULTILINE)
    anchors = {_anchor(h) for h in headings}
    contents = text[text.index("## Contents") : text.index("## Quick start")]
    listed = re.findall(r"\[([^\]]+)\]\(#([^)]+)\)", contents)
    wanted = [h for h in headings if h != "Contents"]
    assert [name for name, _ in listed] == [h.replace("`", "") for h in wanted]
    assert [link for _, link in listed] == [_anchor(h) for h in wanted]
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in anchors, link
