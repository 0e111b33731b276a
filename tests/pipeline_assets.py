"""Tiny end-to-end assets for pipeline and CLI tests: a small TTS model, a small codec and the demo tokenizer."""

from __future__ import annotations

import torch

from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel
from configuration_moss_tts_nano import MossTTSNanoConfig
from demo import demo_prompt_audio
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from test_codec_common import randomize, tiny_config
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


class UpstreamStyleCodec(MossAudioTokenizerModel):
    """Stand-in for upstream's codec class (what vLLM-Omni loads from the hub): one streaming state per object.

    As upstream: a second decode session, or a one-shot decode while one is open, raises; and the class does not
    declare independent decode sessions, so the pipeline must keep each request's stream state off this object.
    """

    independent_decode_sessions = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.sessions_opened = 0
        self._open_session = None

    def _session_is_open(self) -> bool:
        return self._open_session is not None and not self._open_session.closed

    def create_decode_session(self, max_batch_size: int, use_cuda_graph: bool = False):
        if self._session_is_open():
            raise RuntimeError("cannot open another decode session: one per model (upstream)")
        self._open_session = super().create_decode_session(max_batch_size, use_cuda_graph)
        self.sessions_opened += 1
        return self._open_session

    def batch_decode(self, codes_list, *args, streaming: bool = False, **kwargs):
        if not streaming and self._session_is_open():
            raise RuntimeError("cannot decode while a streaming decode session is open (upstream)")
        return super().batch_decode(codes_list, *args, streaming=streaming, **kwargs)


def upstream_style_codec(seed: int = 0) -> UpstreamStyleCodec:
    """The stand-in with the weights of ``tiny_codec_model(seed)``."""
    torch.manual_seed(seed)
    return randomize(UpstreamStyleCodec(tiny_config()), seed)


def poison_text_logits(monkeypatch, model: MossTTSNanoForCausalLM, steps: set[int]) -> list[tuple]:
    """Non-finite text logits at the given step numbers (0-based) of `model` (not of its float32 retry model);
    returns the (step model, dtype, attention) of every step, recorded as they run."""
    import model_runner

    seen = []
    real = model_runner.sample_frame

    def poisoned(step_model, *args, **kwargs):
        frame = real(step_model, *args, **kwargs)
        seen.append((step_model, next(step_model.parameters()).dtype, step_model.get_attention_implementation()))
        if step_model is model and len(seen) - 1 in steps:
            frame.text_finite = torch.zeros_like(frame.text_finite)
        return frame

    monkeypatch.setattr(model_runner, "sample_frame", poisoned)
    return seen
