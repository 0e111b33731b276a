"""transformers 4.57 copies, for a local checkpoint folder, only the modules that the modeling file itself imports
relatively: every module reachable from it must be listed there (the README's copy step relies on it). The same
holds for the codec's own remote-code folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _relative_imports(folder: Path, name: str) -> set[str]:
    text = (folder / f"{name}.py").read_text(encoding="utf-8")
    modules = re.findall(r"^\s*from \.(\w+) import", text, re.M)
    return set(modules) | set(re.findall(r"^\s*from \. import (\w+)", text, re.M))


@pytest.mark.parametrize("folder, modeling", [
    (ROOT, "modeling_moss_tts_nano"),
    (ROOT / "audio_tokenizer", "modeling_moss_audio_tokenizer"),
])
def test_every_reachable_module_is_listed_in_the_modeling_file(folder: Path, modeling: str):
    listed = _relative_imports(folder, modeling)
    reachable, todo = set(), list(listed)
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo.extend(_relative_imports(folder, name))
    assert sorted(reachable - listed) == []
