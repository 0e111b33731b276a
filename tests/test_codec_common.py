"""Shared helpers for the codec tests: a tiny random codec, the golden fixture, and comparison helpers."""

from __future__ import annotations

import copy
import json
import pathlib
import shutil

import numpy as np
import pytest
import torch

from audio_tokenizer.configuration_moss_audio_tokenizer import MossAudioTokenizerConfig
from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODEC_DIR = ROOT / "audio_tokenizer"
FRAME = 3840


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run a codec test module on one intra-op thread and restore the setting afterwards.

    Why: the tiny test models issue thousands of small ops; on a busy shared CPU, OpenMP barriers between
    descheduled threads made them ~10x slower. Results are identical with one or more threads.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _transformer(input_dimension: int, output_dimension: int, context: float) -> dict:
    return {"module_type": "Transformer", "input_dimension": input_dimension, "output_dimension": output_dimension,
            "d_model": 16, "num_heads": 2, "num_layers": 1, "dim_feedforward": 32, "context_duration": context,
            "causal": True, "norm": "layer_norm", "positional_embedding": "rope", "max_period": 10000,
            "gating": "none", "layer_scale": 0.5, "conv_layout": True}


def tiny_config(contexts: tuple[float, float, float, float] = (0.1, 0.12, 0.16, 0.2), **overrides
                ) -> MossAudioTokenizerConfig:
    """The released layout (patches 240/2/2/2/4, 16 x 1024 codes) with 16-wide, 1-layer stages.

    The default contexts are 40/24/16/10 tokens, i.e. 1-2.5 frames, so a few frames cross every window.
    """
    patch = lambda size: {"module_type": "PatchedPretransform", "patch_size": size}  # noqa: E731
    encoder = [patch(240), _transformer(240, 16, contexts[0]), patch(2), _transformer(32, 16, contexts[1]),
               patch(2), _transformer(32, 16, contexts[2]), patch(2), _transformer(32, 8, contexts[3]), patch(4)]
    quantizer = {"input_dim": 32, "rvq_dim": 16, "output_dim": 32, "num_quantizers": 16, "codebook_size": 1024,
                 "codebook_dim": 8, "quantizer_type": "rlfq"}
    kwargs = dict(encoder_kwargs=encoder, quantizer_kwargs=quantizer, code_dim=32)
    kwargs.update(overrides)
    return MossAudioTokenizerConfig(**kwargs)


@torch.no_grad()
def randomize(model: MossAudioTokenizerModel, seed: int = 0) -> MossAudioTokenizerModel:
    """Give every parameter O(1)-scaled random values so decoded audio is far from zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("scale"):
            param.fill_(0.5)
        elif ".norm" in name:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator) if name.endswith("weight")
                        else 0.1 * torch.randn(param.shape, generator=generator))
        else:
            fan_in = param.shape[1] if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
    return model.eval()


def tiny_model(seed: int = 0, **config_overrides) -> MossAudioTokenizerModel:
    torch.manual_seed(seed)
    return randomize(MossAudioTokenizerModel(tiny_config(**config_overrides)), seed)


def random_codes(frames: int, seed: int = 0, nq: int = 16) -> torch.Tensor:
    return torch.randint(0, 1024, (nq, frames), generator=torch.Generator().manual_seed(seed))


def random_wav(samples: int, seed: int = 0, channels: int = 2) -> torch.Tensor:
    return 0.3 * torch.randn(channels, samples, generator=torch.Generator().manual_seed(seed))


def max_rel(a: torch.Tensor, b, peak: float) -> float:
    """Max abs difference relative to ``peak``."""
    b = torch.as_tensor(np.asarray(b)) if not isinstance(b, torch.Tensor) else b
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    return float((a.double() - b.double()).abs().max()) / peak


def stream_decode(model: MossAudioTokenizerModel, codes: torch.Tensor, windows) -> torch.Tensor:
    """Decode one row through ``batch_decode(streaming=True)`` in the given windows; returns ``(C, T)``."""
    pieces, start = [], 0
    try:
        for index, size in enumerate(windows):
            first = index == 0
            out = model.batch_decode([codes[:, start: start + size]], streaming=True, reset_stream=first,
                                     max_batch_size=1 if first else None)
            assert out.audio_lengths.tolist() == [size * FRAME]
            assert out.audio.shape == (1, model.number_channels, size * FRAME)
            pieces.append(out.audio[0])
            start += size
    finally:
        model._reset_batch_decode_streaming_state()
    assert start == codes.shape[-1]
    return torch.cat(pieces, dim=-1)


def copy_codec_code(directory: pathlib.Path) -> None:
    """Copy the remote-code files (``audio_tokenizer/*.py``) into ``directory``."""
    for source in CODEC_DIR.glob("*.py"):
        shutil.copy(source, directory / source.name)


def released_config_dict() -> dict:
    return copy.deepcopy(json.loads((CODEC_DIR / "config.json").read_text()))
