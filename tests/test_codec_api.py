"""Public codec API on a tiny random model: shapes, length rules, wrappers, bad inputs, dtype and backend knobs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from audio_tokenizer import codec_layers
from audio_tokenizer.modeling_moss_audio_tokenizer import (
    MossAudioTokenizerDecoderOutput,
    MossAudioTokenizerEncoderOutput,
    MossAudioTokenizerModel,
)
from test_codec_common import (  # noqa: F401 (single_thread is an autouse fixture)
    FRAME,
    max_rel,
    random_codes,
    random_wav,
    stream_decode,
    tiny_config,
    tiny_model,
    single_thread,
)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_attributes(model):
    assert (model.sampling_rate, model.sample_rate, model.number_channels) == (48000, 48000, 2)
    assert (model.downsample_rate, model.frame_rate) == (3840, 12.5)
    assert model.main_input_name == "input_values" and model.base_model_prefix == ""
    assert (model.compute_dtype_name, model.compute_dtype, model.attention_implementation) == ("fp32", None, "sdpa")
    assert model.enable_channel_interleave and model.causal_transformer_context_duration == 0.1
    assert model.config.sample_rate == 48000 and model.config.frame_rate == 12.5


@pytest.mark.parametrize("samples, frames, valid", [(48000, 13, 12), (3839, 1, 0), (3841, 2, 1), (3840, 1, 1)])
def test_encode_length_rules(model, samples, frames, valid):
    out = model.batch_encode([random_wav(samples)])
    assert isinstance(out, MossAudioTokenizerEncoderOutput)
    assert out.audio_codes.shape == (16, 1, frames) and out.audio_codes.dtype == torch.int64
    assert out.audio_codes_lengths.tolist() == [valid]
    assert out.encoder_hidden_states.shape == (1, 32, frames)
    assert int(out.audio_codes.min()) >= 0 and int(out.audio_codes.max()) < 1024


def test_batched_encode_matches_single_items(model):
    wavs = [random_wav(5 * FRAME + 100, seed=1), random_wav(2 * FRAME, seed=2)]
    batched = model.batch_encode(wavs)
    assert batched.audio_codes.shape == (16, 2, 6) and batched.audio_codes_lengths.tolist() == [5, 2]
    for row, wav in enumerate(wavs):
        single = model.batch_encode([wav])
        n = single.audio_codes_lengths[0]
        assert torch.equal(batched.audio_codes[:, row, :n], single.audio_codes[:, 0, :n])


def test_decode_shapes_and_padding(model):
    items = [random_codes(3, seed=3), random_codes(5, seed=4), random_codes(0, seed=5)]
    out = model.batch_decode(items)
    assert isinstance(out, MossAudioTokenizerDecoderOutput)
    assert out.audio.shape == (3, 2, 5 * FRAME) and out.audio.dtype == torch.float32
    assert out.audio_lengths.tolist() == [3 * FRAME, 5 * FRAME, 0]
    single = model.batch_decode([items[1]]).audio[0]
    assert max_rel(out.audio[1], single, float(single.abs().max())) <= 1e-5
    empty = model.batch_decode([random_codes(0)])
    assert empty.audio.shape == (1, 2, 0) and empty.audio_lengths.tolist() == [0]


def test_streaming_returns_one_frame_of_samples_per_code_frame(model):
    audio = stream_decode(model, random_codes(7, seed=6), [2, 1, 4])
    assert audio.shape == (2, 7 * FRAME)


def test_fewer_quantizers(model):
    wav = random_wav(4 * FRAME, seed=7)
    full = model.batch_encode([wav]).audio_codes
    eight = model.batch_encode([wav], num_quantizers=8).audio_codes
    assert eight.shape == (8, 1, 4) and torch.equal(eight, full[:8])
    codes = full[:, 0]
    by_argument = model.batch_decode([codes], num_quantizers=8).audio
    assert torch.equal(by_argument, model.batch_decode([codes[:8]]).audio)
    assert not torch.equal(by_argument, model.batch_decode([codes]).audio)
    mixed = model.batch_decode([codes, codes[:10]], num_quantizers=10)
    assert mixed.audio.shape == (2, 2, 4 * FRAME)
    assert torch.equal(model.decode(full, num_quantizers=8).audio, by_argument)


def test_encode_decode_wrappers(model):
    wav = torch.stack([random_wav(3 * FRAME, seed=8), random_wav(3 * FRAME, seed=9)])  # (B, C, T)
    mask = torch.ones(2, 3 * FRAME, dtype=torch.long)
    mask[1, 2 * FRAME:] = 0
    encoded = model.encode(wav, padding_mask=mask)
    expected = model.batch_encode([wav[0], wav[1, :, : 2 * FRAME]])
    assert torch.equal(encoded.audio_codes, expected.audio_codes)
    codes, lengths = model.encode(wav[0], return_dict=False)
    assert codes.shape == (16, 1, 3) and lengths.tolist() == [3]
    decoded = model.decode(encoded.audio_codes, padding_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert decoded.audio_lengths.tolist() == [3 * FRAME, 2 * FRAME]
    (audio,) = model.decode(encoded.audio_codes[:, 0], return_dict=False)
    assert torch.equal(audio, model.batch_decode([encoded.audio_codes[:, 0]]).audio)


def test_forward(model):
    wav = random_wav(2 * FRAME + 10, seed=10)[None]
    out = model(wav)
    assert out.audio_codes.shape == (16, 1, 3) and out.audio_codes_lengths.tolist() == [2]
    assert out.audio.shape == (1, 2, 3 * FRAME) and out.audio_lengths.tolist() == [2 * FRAME]
    codes, audio, lengths = model(wav, return_dict=False)
    assert torch.equal(codes, out.audio_codes) and torch.equal(audio, out.audio)
    decoded = model(audio_codes=out.audio_codes)
    assert decoded.audio_codes_lengths is None and decoded.audio.shape == (1, 2, 3 * FRAME)
    assert out["audio"] is out.audio and out[0] is out.audio
    with pytest.raises(ValueError, match="input_values"):
        model()


@pytest.mark.parametrize("wav, message", [
    (torch.zeros(1, 2, 100), "shape"),
    (torch.zeros(1, 100), "channels=2"),
    (torch.zeros(100), "channels=2"),
    (torch.zeros(2, 0), "empty"),
    (torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), "NaN or Inf"),
    (torch.tensor([[0.0, float("inf")], [0.0, 0.0]]), "NaN or Inf"),
    (torch.zeros(2, 10, dtype=torch.int16), "floating point"),
])
def test_bad_waveforms(model, wav, message):
    with pytest.raises(ValueError, match=message):
        model.batch_encode([wav])


def test_bad_encode_arguments(model):
    wav = random_wav(FRAME)
    for bad in ([], wav, None):
        with pytest.raises(ValueError, match="wav_list"):
            model.batch_encode(bad)
    for bad in (0, 17, True, 2.0):
        with pytest.raises(ValueError, match="num_quantizers"):
            model.batch_encode([wav], num_quantizers=bad)
    for bad in (0.1, 0.0, -0.08, "1"):
        with pytest.raises(ValueError, match="chunk_duration"):
            model.batch_encode([wav], chunk_duration=bad)
    with pytest.raises(ValueError, match="input_values"):
        model.encode(torch.zeros(1, 1, 2, 10))
    with pytest.raises(ValueError, match="padding_mask"):
        model.encode(torch.zeros(2, 2, 10), padding_mask=torch.ones(2, 9))


def test_bad_codes(model):
    good = random_codes(3)
    negative, too_big = good.clone(), good.clone()
    negative[2, 1], too_big[5, 0] = -1, 1024
    cases = [
        ([negative], "codes in \\[-1, .*valid codes are in \\[0, 1024\\)"),
        ([too_big], "valid codes"),
        ([good.float()], "integers"),
        ([good[0]], "shape"),
        ([random_codes(3, nq=17)], "quantizer rows"),
        ([good, good[:8]], "different quantizer counts"),
        ([], "non-empty"),
    ]
    for codes_list, message in cases:
        with pytest.raises(ValueError, match=message):
            model.batch_decode(codes_list)
    with pytest.raises(ValueError, match="num_quantizers"):
        model.batch_decode([good[:8]], num_quantizers=9)
    with pytest.raises(ValueError, match="num_quantizers"):
        model.batch_decode([good], num_quantizers=0)
    with pytest.raises(ValueError, match="exceeds"):
        model.decode(good[:4], num_quantizers=5)
    with pytest.raises(ValueError, match="audio_codes"):
        model.decode(good[None, None])
    with pytest.raises(ValueError, match="chunk_duration"):
        model.batch_decode([good], chunk_duration=0.05)


def test_compute_dtype_bf16_on_cpu_is_finite():
    model = tiny_model()
    wav, codes = random_wav(2 * FRAME, seed=11), random_codes(6, seed=12)
    reference = model.batch_decode([codes]).audio[0]
    model.set_compute_dtype("bf16")
    assert (model.compute_dtype_name, model.compute_dtype) == ("bf16", torch.bfloat16)
    assert model.config.compute_dtype == "bf16"
    decoded = model.batch_decode([codes]).audio[0]
    assert decoded.dtype == torch.float32 and bool(torch.isfinite(decoded).all())
    assert max_rel(decoded, reference, float(reference.abs().max())) < 0.5
    streamed = stream_decode(model, codes, [2, 4])
    assert bool(torch.isfinite(streamed).all())
    codes_bf16 = model.batch_encode([wav]).audio_codes
    assert codes_bf16.shape == (16, 1, 2) and codes_bf16.dtype == torch.int64


def test_compute_dtype_fp16_falls_back_to_fp32_on_cpu():
    model = tiny_model(compute_dtype="fp16")
    assert model.compute_dtype == torch.float16
    codes = random_codes(3, seed=13)
    fp16 = model.batch_decode([codes]).audio
    model.set_compute_dtype(torch.float32)
    assert torch.equal(fp16, model.batch_decode([codes]).audio)


def test_flash_attention_2_config_value_runs_sdpa():
    codes = random_codes(4, seed=14)
    flash = tiny_model(attention_implementation="flash_attention_2")
    assert flash.attention_implementation == "flash_attention_2"
    assert torch.equal(flash.batch_decode([codes]).audio, tiny_model().batch_decode([codes]).audio)
    flash.set_attention_implementation("sdpa")
    assert {m.attention_implementation for m in flash.modules() if hasattr(m, "attention_implementation")} == {
        "sdpa"}


def test_bad_knobs(model):
    with pytest.raises(ValueError, match="compute_dtype='fp8'"):
        model.set_compute_dtype("fp8")
    with pytest.raises(ValueError, match="attention_implementation='eager'"):
        model.set_attention_implementation("eager")
    assert model.compute_dtype_name == "fp32" and model.attention_implementation == "sdpa"


def test_one_shot_attention_blocks_match_full_mask(monkeypatch):
    """Sequences longer than one query block are attended in blocks; they equal the full-mask result."""
    model = tiny_model()
    codes = random_codes(20, seed=15)  # 640 tokens at 400 Hz vs a context of 40: blocked
    assert len(codec_layers.WindowPlan._blocks(640, 40)) == 5  # blocks of MIN_QUERY_BLOCK = 128 queries
    assert codec_layers.WindowPlan._blocks(3200, 1600)[-1] == (3000, 3200, 1401)  # an eighth of the context
    blocked = model.batch_decode([codes]).audio
    monkeypatch.setattr(codec_layers.WindowPlan, "_blocks", staticmethod(lambda length, context: [(0, length, 0)]))
    full = model.batch_decode([codes]).audio
    assert max_rel(blocked, full, float(full.abs().max())) <= 1e-6


def test_mono_model():
    encoder = tiny_config().encoder_kwargs
    encoder[-1] = {"module_type": "PatchedPretransform", "patch_size": 2}
    encoder[-2] = dict(encoder[-2], output_dimension=16)
    config = tiny_config(encoder_kwargs=encoder, number_channels=1)
    model = MossAudioTokenizerModel(config).eval()
    assert config.interleave_factor == 1 and math.prod(
        e["patch_size"] for e in encoder if e["module_type"] == "PatchedPretransform") == 3840
    out = model.batch_encode([torch.zeros(2 * FRAME), torch.zeros(1, FRAME)])
    assert out.audio_codes.shape == (16, 2, 2) and out.audio_codes_lengths.tolist() == [2, 1]
    assert model.batch_decode([out.audio_codes[:, 0]]).audio.shape == (1, 1, 2 * FRAME)


def test_compute_autocast_follows_the_parameter_device_type_simulated(model):
    """Autocast is chosen per device type (no CUDA needed to build the context objects)."""
    try:
        model.set_compute_dtype("bf16")
        cpu = model._compute_autocast(torch.device("cpu"))
        assert isinstance(cpu, torch.autocast) and (cpu.device, cpu.fast_dtype) == ("cpu", torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available": the context object is all we inspect
            cuda = model._compute_autocast(torch.device("cuda"))
        assert isinstance(cuda, torch.autocast) and (cuda.device, cuda.fast_dtype) == ("cuda", torch.bfloat16)
        model.set_compute_dtype("fp16")
        assert not isinstance(model._compute_autocast(torch.device("cpu")), torch.autocast)  # fp32 on CPU
        assert not isinstance(model._compute_autocast(torch.device("meta")), torch.autocast)  # no autocast there
        model.set_compute_dtype("fp32")
        assert not isinstance(model._compute_autocast(torch.device("cuda")), torch.autocast)
    finally:
        model.set_compute_dtype("fp32")
