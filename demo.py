"""Built-in demo assets: the released architectures with seeded random weights, no download needed.

The demo exercises the whole pipeline (tokenizer, codec encode, generation, codec decode, file writing) at the
real model sizes. Its weights are random, so the audio it produces is noise, not speech.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codec_loading import codec_code_module
from .configuration_moss_tts_nano import MossTTSNanoConfig
from .modeling_moss_tts_nano import MossTTSNanoForCausalLM
from .tokenization_moss_tts_nano import build_demo_tokenizer

DEMO_TEXT = "Hello! This is the MOSS-TTS-Nano demo running with random weights, so expect noise, not speech."
CONTINUE_LOGIT_GAP = 40.0  # how strongly the random local decoder is pushed to keep generating (see below)
DEMO_PEAK = 0.3  # decoded demo audio is scaled to peak near this amplitude (random codecs decode to ~1e-7)
CODEC_CONFIG = Path(__file__).resolve().parent / "audio_tokenizer" / "config.json"


@dataclass
class DemoAssets:
    model: Any
    tokenizer: Any
    codec: Any
    prompt_audio: torch.Tensor  # [2, N] at 48 kHz
    workdir: tempfile.TemporaryDirectory


def _push_towards_continue(model: Any, gap: float) -> None:
    """Shift the local ln_f bias so the text step prefers "continue" (id 9) over "audio_end" (id 7) by ``gap``.

    Random weights would otherwise stop after a random number of frames; the golden fixture uses the same trick.
    """
    cfg = model.config
    wte = model.transformer.wte.weight
    direction = (wte[cfg.audio_assistant_slot_token_id] - wte[cfg.audio_end_token_id]).float()
    bias = model.local_transformer.ln_f.bias
    bias.add_((gap * direction / direction.pow(2).sum()).to(bias.dtype))


def build_demo_model(seed: int = 0, config_overrides: dict | None = None) -> Any:
    """The released TTS architecture (spec §2) with seeded random weights."""
    torch.manual_seed(seed)
    config = MossTTSNanoConfig(**(config_overrides or {}))
    model = MossTTSNanoForCausalLM(config).eval()
    with torch.no_grad():
        _push_towards_continue(model, CONTINUE_LOGIT_GAP)
    return model


def build_demo_codec(seed: int = 0, config_overrides: dict | None = None) -> Any:
    """The released codec architecture with seeded random weights, scaled so that it decodes audible noise."""
    module = codec_code_module()
    settings = json.loads(CODEC_CONFIG.read_text())
    settings.update(config_overrides or {})
    config = module.MossAudioTokenizerConfig(**settings)
    torch.manual_seed(seed)
    codec = module.MossAudioTokenizerModel(config).eval()
    with torch.no_grad():
        for name, param in codec.named_parameters():
            if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                param.fill_(0.5)
        probe = torch.randint(0, 1024, (codec.config.num_quantizers, 4), generator=torch.Generator().manual_seed(seed))
        peak = codec.batch_decode([probe]).audio.abs().max().clamp_min(1e-12)
        last = [m for n, m in codec.named_modules() if n.startswith("decoder.") and hasattr(m, "output_proj")][-1]
        last.output_proj.weight.mul_(DEMO_PEAK / peak)  # a plain Linear: no derived weight cache to refresh
    return codec


def demo_prompt_audio(seconds: float = 1.0, sample_rate: int = 48000, seed: int = 0) -> torch.Tensor:
    """A synthetic stereo reference: a vowel-like harmonic tone with a little noise."""
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    tone = sum(torch.sin(2 * torch.pi * 140.0 * k * t) / k for k in range(1, 6))
    noise = 0.02 * torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    mono = 0.2 * tone / tone.abs().max() + noise
    return torch.stack([mono, mono]).float()


def build_demo_assets(seed: int = 0) -> DemoAssets:
    workdir = tempfile.TemporaryDirectory(prefix="moss_tts_nano_demo_")
    tokenizer = build_demo_tokenizer(workdir.name)
    return DemoAssets(build_demo_model(seed), tokenizer, build_demo_codec(seed), demo_prompt_audio(seed=seed), workdir)
