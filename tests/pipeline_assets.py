"""Tiny end-to-end assets for pipeline and CLI tests: a small TTS model, a small codec and the demo tokenizer."""

from __future__ import annotations

import torch

from configuration_moss_tts_nano import MossTTSNanoConfig
from demo import demo_prompt_audio
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from test_codec_common import tiny_model as tiny_codec_model
from tokenization_moss_tts_nano import build_demo_tokenizer


def tiny_tts(seed: int = 0, push: float = 40.0) -> MossTTSNanoForCausalLM:
    """16 x 1024 codebooks like the release, with a 2-layer 32-wide global decoder and a 1024-token vocabulary."""
    config = MossTTSNanoConfig(
        gpt2_config=dict(n_embd=32, n_head=4, n_layer=2, n_inner=64, vocab_size=1024, n_positions=2048),
        local_transformer_layers=1,
    )
    torch.manual_seed(seed)
    model = MossTTSNanoForCausalLM(config).eval()
    with torch.no_grad():  # prefer "continue" over "audio_end" so runs last the requested frames
        wte = model.transformer.wte.weight
        direction = wte[9] - wte[7]
        model.local_transformer.ln_f.bias += push * direction / direction.pow(2).sum()
    return model


class TinyAssets:
    def __init__(self, directory) -> None:
        self.model = tiny_tts()
        self.codec = tiny_codec_model(seed=0)
        self.tokenizer = build_demo_tokenizer(directory)
        self.prompt_audio = demo_prompt_audio(seconds=0.5)

    def resources(self) -> dict:
        return {"text_tokenizer": self.tokenizer, "audio_tokenizer": self.codec}
