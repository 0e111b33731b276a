"""The README and docs/ say what the repository is: the layout table (docs/architecture.md) names every module, and its Python usage runs as
written (the copy step, then the example) on tiny assets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import soundfile

from pipeline_assets import TinyAssets

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def _section(title: str, text: str = README) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_layout_table_names_every_module_and_only_existing_ones():
    named = set(re.findall(r"`([\w./]+)`", _section("Layout", ARCHITECTURE)))
    modules = {p.name for p in ROOT.glob("*.py")} | {p.name for p in (ROOT / "audio_tokenizer").glob("*.py")}
    assert sorted(modules - {"__init__.py"} - named) == []
    stale = [name for name in named if name.endswith(".py") and name not in modules and not (ROOT / name).is_file()]
    assert stale == []


def test_python_usage_runs_as_written_after_the_copy_step(tmp_path):
    section = _section("Python usage")
    copy_step, = _code_blocks(section, "bash")
    example = _code_blocks(section, "python")[0]
    assert section.index(copy_step) < section.index(example)  # the copy step comes first
    assert ".to(device)" in example

    # What a user has at that point: the released checkpoint and codec folders and a reference recording.
    assets = TinyAssets(tmp_path / "MOSS-TTS-Nano")
    checkpoint = tmp_path / "MOSS-TTS-Nano"
    assets.model.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = json.loads((ROOT / "config.json").read_text())["auto_map"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    assets.codec.save_pretrained(tmp_path / "MOSS-Audio-Tokenizer-Nano")
    soundfile.write(str(tmp_path / "reference.wav"), assets.prompt_audio.numpy().T, 48000)

    env = {**os.environ, "REPO": str(ROOT), "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", "-c", copy_step], cwd=tmp_path, env=env, check=True)
    run = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "out.wav torch.Size([2, " in run.stdout
    data, rate = soundfile.read(str(tmp_path / "out.wav"), always_2d=True)
    assert rate == 48000 and data.shape[1] == 2 and data.shape[0] > 0


def _documented_commands() -> dict[str, set[str]]:
    """Every `python <script>.py ...` in the bash blocks of README.md and docs/*.md: script -> the flags it is given."""
    texts = [README] + [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    commands: dict[str, set[str]] = {}
    for block in (b for text in texts for b in _code_blocks(text, "bash")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0]
            for match in re.finditer(r"python3? ((?:benchmarks/)?\w+\.py)((?:\s+[^|;&]*)?)", line):
                flags = set(re.findall(r"(?<!\S)(--[\w-]+)", match.group(2)))
                commands.setdefault(match.group(1), set()).update(flags)
    return commands


def test_every_documented_command_names_a_real_script_and_its_flags():
    commands = _documented_commands()
    assert {"infer_npu.py", "serve_npu.py", "verify_npu.py"} <= set(commands)
    for script, flags in sorted(commands.items()):
        assert (ROOT / script).is_file(), script
        run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (script, run.stderr[-2000:])
        unknown = sorted(flag for flag in flags if flag not in run.stdout)
        assert unknown == [], f"{script}: documented flags it does not take: {unknown}"
