"""transformers 4.57 copies, for a local checkpoint folder, only the modules that modeling_moss_tts_nano.py itself
imports relatively: every module reachable from it must be listed there (the README's copy step relies on it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _relative_imports(name: str) -> set[str]:
    text = (ROOT / f"{name}.py").read_text(encoding="utf-8")
    modules = re.findall(r"^\s*from \.(\w+) import", text, re.M)
    return set(modules) | set(re.findall(r"^\s*from \. import (\w+)", text, re.M))


def test_every_reachable_module_is_listed_in_the_modeling_file():
    listed = _relative_imports("modeling_moss_tts_nano")
    reachable, todo = set(), list(listed)
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo.extend(_relative_imports(name))
    assert sorted(reachable - listed) == []
