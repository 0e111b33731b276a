"""The README's Python usage: AutoModel with trust_remote_code on a checkpoint folder, then inference()."""

from __future__ import annotations

import shutil
from pathlib import Path

import soundfile
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint_with_repository_code(tmp_path: Path) -> Path:
    tts, codec = shared_path("golden", "tts_tiny"), shared_path("golden", "codec_tiny")
    root = tmp_path / "MOSS-TTS-Nano"
    root.mkdir()
    for source in ROOT.glob("*.py"):
        shutil.copy(source, root / source.name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / name, root / name)
    shutil.copy(shared_path("data", "tokenizer.model"), root / "tokenizer.model")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tts / name, root / name)
    codec_dir = root / "audio_tokenizer"
    shutil.copytree(ROOT / "audio_tokenizer", codec_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(codec / "config.json", codec_dir / "config.json")
    shutil.copy(codec / "model.safetensors", codec_dir / "model.safetensors")
    return root


def test_auto_model_inference_and_stream_from_a_checkpoint_folder(tmp_path):
    root = _checkpoint_with_repository_code(tmp_path)
    model = AutoModel.from_pretrained(str(root), trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules")  # the folder's code, as users get it
    tokenizer = AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)
    assert tokenizer.encode("Hello world.", add_special_tokens=False) == [7026, 1177, 10380]

    out = tmp_path / "out.wav"
    prompt = str(shared_path("data", "zh_1.wav"))
    result = model.inference("Hello world.", str(out), prompt_audio_path=prompt, max_new_frames=4)
    data, rate = soundfile.read(str(out), always_2d=True)
    assert rate == 48000 and data.shape == (result["waveform"].shape[-1], 2)
    assert result["reference_audio_token_ids"].shape[1] == 16

    events = list(model.inference_stream("Hello world.", prompt_audio_path=prompt, max_new_frames=4))
    streamed = torch.cat([e["waveform"] for e in events if e["type"] in ("audio", "pause")], dim=-1)
    assert torch.allclose(streamed, result["waveform"], atol=1e-5)
