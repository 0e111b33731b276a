"""`inference` and `inference_stream`: the text-to-speech methods of `MossTTSNanoForCausalLM` (text and prompt audio
in, a 48 kHz waveform out), as a mixin of that class.

The methods and their documented arguments (upstream's names and keywords) live here; the work is pipeline.py's,
imported on first use, so that importing the model or generating codes never needs the audio and tokenizer
dependencies.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional


class SynthesisMethods:
    """The text-to-speech methods of `MossTTSNanoForCausalLM` (mixed into the model class)."""

    def inference(self, text: str, output_audio_path: Optional[str] = None, **kwargs: Any) -> dict:
        """Text (+ prompt audio) to a 48 kHz stereo waveform, optionally written to a file (atomically).

        Args:
            text: what to say. A text over `voice_clone_max_text_tokens` (50) is normalised and split into chunks
                within it (docs/model.md); a text that fits is used as given. voice_clone chunks are generated
                independently (batched) and joined with short pauses; continuation chunks one after another, each
                continuing the previous chunk's text and audio, into one continuous waveform.
            output_audio_path: .wav/.flac/.ogg file to write (parent directories are created), or None.
            mode: "voice_clone" (prompt audio, no prompt text) or "continuation" (no prompt at all, or prompt_text +
                prompt audio). Default: inferred from the prompt like infer_npu.py does (voice_clone for prompt
                audio without prompt text, else continuation); an explicit mode wins.
            prompt_audio_path / prompt_audio (+ prompt_audio_sample_rate): the reference recording, a file or a
                [channels, samples] tensor; resampled to 48 kHz, mono duplicated; `downmix=True` for > 2 channels.
            prompt_text: transcript of the prompt audio (continuation).
            text_tokenizer / text_tokenizer_path: default: tokenizer.model of the checkpoint directory.
            audio_tokenizer / audio_tokenizer_path (alias audio_tokenizer_pretrained_name_or_path): the codec;
                default: <checkpoint>/audio_tokenizer, else config.audio_tokenizer_pretrained_name_or_path.
            local_files_only: never download the codec.
            device: where the model should be ("auto", "npu:0", "cuda", "cpu", ...): nothing happens when it is
                there; otherwise the model is moved, with a warning (a call running on it meanwhile would fail).
            max_new_frames, do_sample, text_temperature, text_top_p, text_top_k, audio_temperature, audio_top_p,
                audio_top_k, audio_repetition_penalty, nq, use_kv_cache: as in `generate` (same defaults).
            voice_clone_max_text_tokens (token budget of a text chunk, both modes),
                voice_clone_max_memory_per_sample_gb (1.0), voice_clone_chunk_batch_size (cap),
                voice_clone_codec_batch_size: long-text chunking and batching.
            seed: seeds this call's own random generator (on the model's device); the process-wide generators
                (random, numpy, torch) are neither read nor changed, so a seeded call repeats whatever runs beside it.
            generator: a torch.Generator on the model's device to draw from instead (not with seed). Sampling without
                either draws from a fresh generator seeded by the OS.
            progress: callable receiving progress messages for long texts.
            engine: a started `engine.SynthesisEngine` built on this model: the call (all its text chunks) runs
                there, sharing each generation step with the engine's other requests; resources are the engine's.
                Without it, the call steps a private engine core in the calling thread (the same core).

        Returns:
            dict with audio_path, sample_rate (48000), audio_token_ids (a list with one [frames, 16] tensor per
            text chunk), waveform ([2, samples] float32), reference_audio_token_ids, text_chunks,
            voice_clone_text_chunks (None in continuation), truncated_chunks (indices of chunks that reached
            max_new_frames before the model ended them: their audio is cut off), voice_clone_chunk_batch_size (the
            chunks generated side by side, after any out-of-memory halving), voice_clone_codec_batch_size, frames,
            float32_fallback (whether a numerical failure was re-run in float32).

        Raises:
            ValueError: invalid text, prompt, mode combination, sampling value or file.
            RuntimeError: missing codec offline, out of memory at batch 1, or non-finite logits after the float32 retry.

        Every call owns its state (caches, codec decode session, random generator) and only reads the model, codec
        and tokenizer: threads and interleaved `inference_stream` generators may share one model and one codec.
        Resources are loaded once per set of resource arguments (see `pipeline.Synthesizer`). The float32 re-run runs
        a float32 copy kept beside the model, never this model cast in place.
        """
        return pipeline_module().run_inference(self, text, output_audio_path, **kwargs)

    def inference_stream(self, text: str, output_audio_path: Optional[str] = None, **kwargs: Any) -> Iterator[dict]:
        """Streaming `inference`: audio is decoded and yielded while frames are generated.

        Args:
            Same as `inference`.

        Yields:
            {"type": "audio", "waveform": [2, n], "sample_rate", "chunk_index"} as frames are decoded (windows of
            1, 1, 2, 4, then 8 frames: the same bytes however fast the machine is), {"type": "pause", ...} silence between
            voice-clone chunks, then {"type": "result", ...} with `inference`'s fields plus first_audio_latency_s.
            Their concatenation equals the non-streaming waveform for the same codes.

        Raises:
            As `inference`. A call that fails numerically before its first audio event runs again from its start
            in float32 (as `inference` does); after audio went out, the error is raised. The stream owns
            its codec decode session: leaving it early (`break`) affects no other call.
        """
        return pipeline_module().run_inference_stream(self, text, output_audio_path, **kwargs)


def pipeline_module() -> Any:
    """pipeline.py, imported on first use (generation never needs it, nor its audio / tokenizer dependencies)."""
    from . import pipeline
    return pipeline
