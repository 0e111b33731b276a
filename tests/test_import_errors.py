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
        if "{module}" == "modeling_moss_tts_nano":  # the model's inference methods import pipeline on first use
            importlib.import_module("moss_pkg.synthesis_methods").pipeline_module()
        """
    )
    proc = _run(code, tmp_path)
    assert proc.returncode != 0
    assert "sentencepiece" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
    assert "No module named 'devices'" not in proc.stderr
    assert "No module named 'pipeline'" not in proc.stderr


@pytest.mark.parametrize("code", [
    "import repo_imports; repo_imports.install(); import pipeline\n",
    "import modeling_moss_tts_nano, synthesis_methods; synthesis_methods.pipeline_module()\n",
])
def test_missing_dependency_named_when_imported_from_root(code: str) -> None:
    proc = _run(BLOCK_SENTENCEPIECE + code, ROOT)
    assert proc.returncode != 0
    assert "sentencepiece" in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_root_import_by_file_name_is_the_package_module() -> None:
    """A user's `from modeling_moss_tts_nano import ...` in a fresh interpreter, then a sibling by its name: one copy
    of each module, whichever name imported it (repo_imports.py)."""
    code = textwrap.dedent(
        """
        import sys
        from modeling_moss_tts_nano import MossTTSNanoForCausalLM
        import engine, devices, engine_core
        assert sys.modules["moss_tts_nano.modeling_moss_tts_nano"] is sys.modules["modeling_moss_tts_nano"]
        assert devices is sys.modules["moss_tts_nano.devices"] is engine.devices
        assert engine_core.generate_frames is sys.modules["modeling_moss_tts_nano"].generate_frames
        print("ok")
        """
    )
    proc = _run(code, ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_script_runs_from_the_root_with_relative_imports() -> None:
    proc = subprocess.run([sys.executable, "infer_npu.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model-path" in proc.stdout


def test_package_import_works_without_missing_dependency(tmp_path: Path) -> None:
    (tmp_path / "moss_pkg").symlink_to(ROOT, target_is_directory=True)
    proc = _run("import moss_pkg.pipeline, moss_pkg.modeling_moss_tts_nano, moss_pkg.synthesis_methods as s; "
                "s.pipeline_module(); print('ok')", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
