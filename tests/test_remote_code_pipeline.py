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


def _chunk_codes(result: dict) -> list:
    codes = result["audio_token_ids"]
    return codes if isinstance(codes, list) else [codes]  # one tensor per voice-clone text chunk when several


def _as_vllm_omni_stages_reference(source: Path, target: Path) -> str:
    """The worker hands reference audio over as a mono WAV it writes itself (soundfile's default PCM_16)."""
    data, rate = soundfile.read(str(source), dtype="float32", always_2d=True)
    soundfile.write(str(target), data.mean(axis=1), rate)
    return str(target)


def test_vllm_omni_worker_call_sequence_with_interleaved_streams(tmp_path):
    """vLLM-Omni's MOSS-TTS-Nano worker (vllm_omni/model_executor/models/moss_tts_nano/modeling_moss_tts_nano.py):
    AutoModelForCausalLM + torch_dtype, _set_attention_implementation("sdpa"), the codec through AutoModel, a
    search for RoPE inv_freq buffers to repair, then one inference_stream generator per request, each advanced one
    event per scheduler step in turn. Every request must get the audio of its solo run."""
    from transformers import AutoModelForCausalLM

    root = _checkpoint_with_repository_code(tmp_path)
    device = torch.device("cpu")
    lm = AutoModelForCausalLM.from_pretrained(str(root), trust_remote_code=True, torch_dtype=torch.float32)
    lm._set_attention_implementation("sdpa")
    lm.to(device=device)
    lm.eval()
    # the worker recomputes inv_freq of modules named *rotary_emb holding a 1-D float inv_freq tensor (remote-code
    # RoPE buffers come out of from_pretrained as garbage); ours keeps no such buffer, so there is nothing to repair
    assert not [name for name, module in lm.named_modules() if name.endswith("rotary_emb")
                and isinstance(getattr(module, "inv_freq", None), torch.Tensor)]
    codec = AutoModel.from_pretrained(str(root / "audio_tokenizer"), trust_remote_code=True, torch_dtype=torch.float32)
    codec.to(device=device)
    codec.eval()

    # top-k 1 makes the worker's always-on sampling deterministic, so interleaved runs can be compared with solo runs
    sampling = dict(text_temperature=1.0, text_top_p=1.0, text_top_k=1, audio_temperature=0.8, audio_top_p=0.95,
                    audio_top_k=1, audio_repetition_penalty=1.2)
    requests = [("Hello world.", "zh_1"), ("A second request, longer than the first one.", "en_6"),
                ("Third.", "jp_2")]

    def stream(index: int, text: str, reference: str, tag: str):
        prompt = _as_vllm_omni_stages_reference(shared_path("data", f"{reference}.wav"), tmp_path / f"{tag}{index}.wav")
        return lm.inference_stream(
            text=text, output_audio_path=str(tmp_path / f"{tag}{index}_out.wav"), mode="voice_clone",
            prompt_text=None, prompt_audio_path=prompt, text_tokenizer_path=str(root), audio_tokenizer=codec,
            device=device, nq=None, max_new_frames=5, do_sample=True, use_kv_cache=True, **sampling,
        )

    solo = [list(stream(i, text, ref, "solo")) for i, (text, ref) in enumerate(requests)]
    generators = {i: stream(i, text, ref, "step") for i, (text, ref) in enumerate(requests)}
    stepped: dict[int, list] = {i: [] for i in generators}
    while generators:  # one scheduler step: each live request's generator advances by one event
        for i in list(generators):
            event = next(generators[i], None)
            if event is None:
                del generators[i]
            else:
                stepped[i].append(event)

    for i, events in enumerate(solo):
        result = events[-1]
        assert result["type"] == "result" and result["sample_rate"] == 48000
        audio = torch.cat([e["waveform"] for e in events if e["type"] in ("audio", "pause")], dim=-1)
        assert audio.shape[0] == 2 and audio.shape[-1] == result["waveform"].shape[-1] > 0
        data, rate = soundfile.read(str(tmp_path / f"solo{i}_out.wav"), always_2d=True)
        assert rate == 48000 and data.shape == (audio.shape[-1], 2)
        together = stepped[i][-1]
        assert len(_chunk_codes(together)) == len(_chunk_codes(result))
        assert all(torch.equal(a, b) for a, b in zip(_chunk_codes(together), _chunk_codes(result)))
        assert torch.allclose(together["waveform"], result["waveform"], atol=1e-5)
        written, _ = soundfile.read(str(tmp_path / f"step{i}_out.wav"), dtype="int16")
        alone, _ = soundfile.read(str(tmp_path / f"solo{i}_out.wav"), dtype="int16")
        assert abs(written.astype(int) - alone).max() <= 1  # 16-bit files: at most a rounding step apart
