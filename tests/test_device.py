"""Accelerator tests (marker ``device``): tiny models on the NPU or GPU against the CPU float32 reference.

benchmarks/device_check.sh runs them on a machine with an accelerator (`python -m pytest -q -rs -m device tests`
does too). Without one they skip with the reason. ``MOSS_TTS_TEST_DEVICE`` picks the device: an explicit device
that is not usable is an error, not a skip, and ``cpu`` runs them on the CPU as a dry run. ``MOSS_TTS_TEST_DTYPES``
lists the dtypes (default: float32 and the device's default dtype). Tolerances are verify_npu.py's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import devices
from pipeline_assets import tiny_tts
from test_codec_common import random_codes, stream_decode, tiny_model as tiny_codec
from teacher_forcing import measure_codec, measure_greedy, measure_hidden
from verification_metrics import (
    cosine_similarity,
    dtype_name,
    first_divergent_frame,
    max_abs_difference,
    snr_db,
    tolerance_for,
)

pytestmark = pytest.mark.device

DEVICE_ENV = "MOSS_TTS_TEST_DEVICE"
DTYPES_ENV = "MOSS_TTS_TEST_DTYPES"
GREEDY_FRAMES = 6
CODEC_FRAMES = 6


def device_under_test() -> torch.device:
    """The device under test; skips when none was requested and no accelerator is visible."""
    devices.clear_caches()  # probe the real machine, whatever simulated devices earlier tests installed
    requested = os.environ.get(DEVICE_ENV, "").strip()
    if requested:  # explicit: an unusable device raises with its remedy
        return devices.resolve_device(requested)
    found = devices.resolve_device("auto")
    if found.type == "cpu":
        pytest.skip(f"accelerator absent: no NPU or GPU is visible. These tests compare one with CPU float32; "
                    f"benchmarks/device_check.sh runs them where one is ({DEVICE_ENV}=cpu: a dry run on the CPU)")
    return found


def requested_dtypes(device: torch.device) -> list[str]:
    text = os.environ.get(DTYPES_ENV, "").strip()
    if text:
        return [dtype_name(devices.resolve_dtype(name.strip(), device)) for name in text.split(",")]
    return list(dict.fromkeys(["float32", dtype_name(devices.default_dtype(device))]))


@pytest.fixture(scope="module")
def device() -> torch.device:
    return device_under_test()


@pytest.fixture(params=["float32", "float16", "bfloat16"])
def dtype(request: pytest.FixtureRequest, device: torch.device) -> torch.dtype:
    wanted = requested_dtypes(device)
    if request.param not in wanted:
        pytest.skip(f"{request.param} is not requested on {device} (requested: {', '.join(wanted)}; set {DTYPES_ENV})")
    return devices.resolve_dtype(request.param, device)


@pytest.fixture(scope="module")
def tts() -> torch.nn.Module:
    return tiny_tts(seed=3)


def _prompt_batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 9 and 14 rows, left padded: (2, 14, n_vq + 1) and the (2, 14) mask."""
    config = model.config
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.full((2, 14, config.n_vq + 1), config.audio_pad_token_id, dtype=torch.long)
    input_ids[..., 0] = torch.randint(10, config.gpt2_config.vocab_size, (2, 14), generator=generator)
    input_ids[:, -4:-1, 1:] = torch.randint(0, config.audio_codebook_sizes[0], (2, 3, config.n_vq), generator=generator)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :5] = False
    return input_ids, mask


def _on(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def test_tiny_model_hidden_states_on_the_device_match_cpu_float32(tts, device, dtype):
    tolerance = tolerance_for(dtype)
    input_ids, mask = _prompt_batch(tts)
    reference, _ = measure_hidden(tts, input_ids, mask)
    hidden, finite = measure_hidden(_on(tts, device, dtype), input_ids, mask)
    assert finite
    assert cosine_similarity(reference[mask], hidden[mask]) >= tolerance.min_cosine
    if dtype is torch.float32:
        peak = max(1.0, float(reference[mask].abs().max()))
        assert max_abs_difference(reference[mask], hidden[mask]) / peak <= tolerance.max_abs_rel


def test_tiny_model_greedy_codes_on_the_device_match_cpu_float32(tts, device, dtype):
    tolerance = tolerance_for(dtype)
    input_ids, mask = _prompt_batch(tts)
    row = input_ids[1:], mask[1:]
    reference = measure_greedy(tts, *row, GREEDY_FRAMES, tts.config.n_vq)
    codes = measure_greedy(_on(tts, device, dtype), *row, GREEDY_FRAMES, tts.config.n_vq)
    assert reference.shape[0] == GREEDY_FRAMES and codes.shape[1] == tts.config.n_vq
    assert int(codes.min()) >= 0 and int(codes.max()) < max(tts.config.audio_codebook_sizes)
    divergence = first_divergent_frame(reference, codes)
    assert divergence is None or divergence >= tolerance.min_divergence_fraction * GREEDY_FRAMES


def test_tiny_codec_decode_on_the_device_matches_cpu_float32(device, dtype):
    tolerance = tolerance_for(dtype)
    codec = tiny_codec(seed=4)
    codes = random_codes(CODEC_FRAMES, seed=4).t()  # (frames, n_vq)
    reference = measure_codec(copy.deepcopy(codec), codes, 16, torch.device("cpu"), torch.float32)
    waveform = measure_codec(codec, codes, 16, device, dtype)
    assert torch.isfinite(waveform).all()
    peak = float(reference.abs().max())
    assert max_abs_difference(reference, waveform) / peak <= tolerance.codec_max_abs_rel
    assert snr_db(reference, waveform) >= tolerance.codec_min_snr_db


def test_streaming_codec_decode_on_the_device_equals_one_shot(device):
    codec = tiny_codec(seed=6).to(device)
    codes = random_codes(CODEC_FRAMES, seed=6).to(device)
    one_shot = codec.batch_decode([codes]).audio[0].cpu()
    streamed = stream_decode(codec, codes, [1, 2, 3]).cpu()
    assert max_abs_difference(one_shot, streamed) / float(one_shot.abs().max()) <= 1e-4


def test_memory_and_synchronize_helpers_answer_on_the_device(device):
    devices.reset_peak_memory(device)
    block = torch.ones(1 << 20, device=device)
    devices.synchronize(device)
    peak = devices.peak_memory_bytes(device)
    assert peak is not None and peak >= (block.numel() * 4 if device.type != "cpu" else 1)
    free = devices.free_memory_bytes(device)
    assert (free is None) == (device.type == "cpu") and (free is None or free > 0)


def _graph_nq(device: torch.device) -> int:
    """Codebooks of the graph tests: all on a card (a capture takes a moment); 2 in the CPU dry run, where inductor
    compiles each graph for tens of seconds with 16 codebooks on a small CPU (the step's time limit)."""
    return 16 if device.type != "cpu" else 2


def test_captured_or_compiled_step_gives_the_eager_greedy_codes_on_the_device(tts, device):
    """The frame step as a graph (CUDA / NPU graph capture on a card, inductor on `cpu`): greedy codes of a batch of
    two equal the eager step's on the same device in float32, or the step says why it fell back to eager."""
    import compiled_step

    model = _on(tts, device, torch.float32)
    input_ids, mask = _prompt_batch(tts)
    input_ids, mask = input_ids.to(device), mask.to(device)
    settings = dict(max_new_frames=GREEDY_FRAMES, do_sample=False, audio_repetition_penalty=1.2, nq=_graph_nq(device))
    eager = model.generate(input_ids, mask, **settings).audio_token_ids
    compiled_step.enable(model)
    try:
        graphed = model.generate(input_ids, mask, **settings).audio_token_ids
        status = compiled_step.status(model)
    finally:
        compiled_step.disable(model)
    if status.startswith("eager"):
        pytest.skip(f"the step fell back: {status}")
    assert torch.equal(graphed.cpu(), eager.cpu()), status
    if "global decode eager" in status:  # the codes agree, but only the local frame was a graph: say so in the report
        pytest.skip(f"the global decode fell back: {status}")


def test_captured_or_compiled_step_teacher_forced_logits_match_eager_on_the_device(tts, device):
    """Teacher-forced logits through the graph (the greedy codes fed back) against the eager step's on the same device,
    within verify_npu's float32 tolerance, or the step says why it fell back to eager."""
    import compiled_step
    from teacher_forcing import teacher_forced_logits

    model = _on(tts, device, torch.float32)
    input_ids, mask = _prompt_batch(tts)
    nq = _graph_nq(device)
    codes = model.generate(input_ids.to(device), mask.to(device), max_new_frames=GREEDY_FRAMES, do_sample=False,
                           audio_repetition_penalty=1.0, nq=nq).audio_token_ids
    eager = teacher_forced_logits(model, input_ids, mask, codes, nq=nq, compile=False).to("cpu")
    compiled_step.enable(model)
    try:
        graphed = teacher_forced_logits(model, input_ids, mask, codes, nq=nq).to("cpu")
    finally:
        compiled_step.disable(model)
    if graphed.step.startswith("eager"):
        pytest.skip(f"the step fell back: {graphed.step}")
    tolerance = tolerance_for(torch.float32)
    for kind in ("text", "audio"):
        reference, logits = getattr(eager, kind), getattr(graphed, kind)
        assert cosine_similarity(reference, logits) >= tolerance.min_cosine, (kind, graphed.step)
        peak = max(1.0, float(reference.abs().max()))
        assert max_abs_difference(reference, logits) / peak <= tolerance.max_abs_rel, (kind, graphed.step)
    agreement = float((graphed.argmax_codes() == eager.argmax_codes()).double().mean())
    assert agreement >= tolerance.min_argmax_agreement, graphed.step
