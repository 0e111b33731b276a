"""A missing dependency is reported as itself, whether the repository is imported as a package (remote code)
or from its root (tests, scripts): the double-import fallback must not turn it into "No module named 'devices'"."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK_SENTENCEPIECE = "import sys; sys.modules['sentencepiece'] = None\n"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["pipeline", "modeling_moss_tts_nano", "verification"])
def test_missing_dependency_named_when_imported_as_package(tmp_path: Path, module: str) -> None:
    (tmp_path / "moss_pkg").symlink_to(ROOT, target_is_directory=True)
    code = BLOCK_SENTENCEPIECE + textwrap.dedent(
        f"""
        import importlib
        mod = importlib.import_module("moss_pkg.{module}")
        if "{module}" == "modeling_moss_tts_nano":
            mod._pipeline_module()
        """
    )
    proc = _run(code, tmp_path)
    assert proc.returncode != 0
    assert "sentencepiece" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "No module named 'devices'" not in proc.stderr
    assert "No module named 'pipeline'" not in proc.stderr


def test_missing_dependency_named_when_imported_from_root() -> None:
    proc = _run(BLOCK_SENTENCEPIECE + "import pipeline\n", ROOT)
    assert proc.returncode != 0
    assert "sentencepiece" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_package_import_works_without_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "moss_pkg").symlink_to(ROOT, target_is_directory=True)
    proc = _run("import moss_pkg.pipeline, moss_pkg.modeling_moss_tts_nano as m; m._pipeline_module(); print('ok')",
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
