"""Generation (TTS_SPEC §6) on tiny random models: equivalences, stopping, validation and the sampler."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from configuration_moss_tts_nano import MossTTSNanoConfig
from attention import ATTENTION_FUNCTIONS, AttentionMask
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, select_tokens

N_VQ, CODES, PAD = 4, 16, 16


def tiny_model(local_layers=2, push=4.0, seed=0, n_layer=2):
    config = MossTTSNanoConfig(
        gpt2_config=dict(n_embd=32, n_head=4, n_layer=n_layer, n_inner=64, vocab_size=64, n_positions=512),
        n_vq=N_VQ, audio_vocab_size=CODES, audio_pad_token_id=PAD, local_transformer_layers=local_layers,
    )
    torch.manual_seed(seed)
    model = MossTTSNanoForCausalLM(config).eval()
    with torch.no_grad():  # lean the continue / audio_end decision (like the golden fixture's ln_f shift)
        direction = model.transformer.wte.weight[9] - model.transformer.wte.weight[7]
        model.local_transformer.ln_f.bias += push * direction / direction.norm()
    return model


def prompt(length, seed, audio_rows=3):
    gen = torch.Generator().manual_seed(seed)
    audio_rows = min(audio_rows, length - 2)
    rows = torch.full((length, N_VQ + 1), PAD, dtype=torch.long)
    rows[:, 0] = torch.randint(10, 64, (length,), generator=gen)
    rows[-audio_rows - 1 : -1, 0] = 8
    rows[-audio_rows - 1 : -1, 1:] = torch.randint(0, CODES, (audio_rows, N_VQ), generator=gen)
    rows[-1, 0] = 6
    return rows


def batch(*lengths):
    rows = [prompt(length, seed) for seed, length in enumerate(lengths)]
    longest = max(lengths)
    input_ids = torch.full((len(rows), longest, N_VQ + 1), PAD, dtype=torch.long)
    input_ids[..., 0] = 3
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, item in enumerate(rows):
        input_ids[i, longest - len(item) :] = item
        mask[i, longest - len(item) :] = True
    return input_ids, mask


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ------------------------------------------------------------------------------------------------ equivalences


def _generate(model, input_ids, mask, **kwargs):
    kwargs.setdefault("max_new_frames", 6)
    if kwargs.get("do_sample"):
        torch.manual_seed(128)  # a seed whose rows run for several frames
    return model.generate(input_ids, mask, **kwargs)


@pytest.mark.parametrize("settings", [dict(audio_repetition_penalty=1.3), dict(do_sample=True, audio_top_p=0.9),
                                      dict(nq=2, audio_repetition_penalty=0.8)])
def test_cached_equals_uncached_and_sdpa_equals_eager(model, settings):
    # Only eager and sdpa run their own code on a CPU; flash_attention_2 and npu_fusion_attention resolve to sdpa
    # here (test_gpt2_decoder.py tests that resolution and their simulated kernels).
    input_ids, mask = batch(9, 6, 12)
    model.set_attention_implementation("eager")
    reference = _generate(model, input_ids, mask, use_kv_cache=False, **settings)
    assert reference.audio_token_ids.shape[1] > 1
    for backend in ("eager", "sdpa"):
        model.set_attention_implementation(backend)
        assert model.resolved_attention_implementation() == (backend, backend)
        for use_kv_cache in (True, False):
            out = _generate(model, input_ids, mask, use_kv_cache=use_kv_cache, **settings)
            assert torch.equal(out.audio_token_ids, reference.audio_token_ids), (backend, use_kv_cache)
            assert torch.equal(out.num_frames, reference.num_frames)
    model.set_attention_implementation("sdpa")


def test_a_row_alone_equals_the_same_row_in_a_left_padded_batch(model):
    input_ids, mask = batch(5, 11, 8)
    together = _generate(model, input_ids, mask, audio_repetition_penalty=1.2)
    for row in range(3):
        alone = _generate(model, input_ids[row : row + 1, mask[row]], None,
                          audio_repetition_penalty=1.2)
        frames = alone.audio_token_ids.shape[1]
        assert torch.equal(together.audio_token_ids[row, :frames], alone.audio_token_ids[0])


def test_streaming_events_match_generate(model):
    input_ids, mask = batch(7, 4)
    out = model.generate(input_ids, mask, max_new_frames=5)
    events = list(model.generate_stream(input_ids, mask, max_new_frames=5))
    frames, final = events[:-1], events[-1]
    assert [e["type"] for e in frames] == ["frame"] * len(frames) and final["type"] == "final"
    assert [e["step_index"] for e in frames] == list(range(len(frames)))
    assert torch.equal(torch.stack([e["audio_token_ids"] for e in frames], dim=1), out.audio_token_ids)
    assert torch.equal(final["generation"].audio_token_ids, out.audio_token_ids)
    for event in frames:
        assert event["audio_token_ids"].shape == (2, N_VQ)
        assert torch.equal(event["finished_mask"], ~event["active_mask"])


def test_stream_can_be_abandoned(model):
    stream = model.generate_stream(*batch(5), max_new_frames=50)
    assert next(stream)["step_index"] == 0
    stream.close()


def _reference_generate(model, input_ids, mask, frames, penalty, nq):
    """Straightforward greedy loop over the spec: full text head, explicit per-row penalty sets."""
    config, local = model.config, model.local_transformer
    rows, masks, history = input_ids.clone(), mask.clone(), [[set() for _ in range(nq)] for _ in input_ids]
    active, out = torch.ones(len(input_ids), dtype=torch.bool), []
    for _ in range(frames):
        h = model(rows, masks).last_hidden_state[:, -1]  # (B, H)
        sequence, codes = [h], []

        def run_local():
            x = torch.stack(sequence, dim=1)
            positions = torch.arange(x.shape[1])[None]
            hidden, _ = local(x, local.rotary.angles(positions), AttentionMask(), ATTENTION_FUNCTIONS["eager"])
            return hidden[:, -1]

        text_logits = model.text_lm_head(run_local())[:, [9, 7]]
        choice = torch.tensor([9, 7])[text_logits.argmax(-1)]
        active = active & (choice == 9)
        if not active.any():
            break
        sequence.append(model.transformer.wte(choice))
        for channel in range(nq):
            logits = model.audio_lm_heads[channel](run_local())
            for b in range(len(rows)):
                for code in history[b][channel]:
                    value = logits[b, code]
                    logits[b, code] = value * penalty if value < 0 else value / penalty
            code = logits.argmax(-1)
            for b in range(len(rows)):
                history[b][channel].add(int(code[b]))
            codes.append(code)
            sequence.append(model.audio_embeddings[channel](code))
        frame = torch.full((len(rows), config.n_vq), PAD)
        frame[:, :nq] = torch.stack(codes, dim=1).masked_fill(~active[:, None], PAD)
        out.append(frame)
        next_row = torch.cat([torch.where(active, 9, 3)[:, None], frame], dim=-1)
        rows, masks = torch.cat([rows, next_row[:, None]], dim=1), torch.cat([masks, active[:, None]], dim=1)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("local_layers, n_layer, nq, push, seed",
                         [(2, 2, 3, 4.0, 2), (3, 1, 4, 1.0, 3), (1, 3, 4, 0.5, 1), (3, 1, 3, 0.2, 4)])
def test_matches_a_straightforward_reference_loop(local_layers, n_layer, nq, push, seed):
    model = tiny_model(local_layers=local_layers, push=push, seed=seed, n_layer=n_layer)
    input_ids, mask = batch(6, 9, 4)
    with torch.no_grad():
        expected = _reference_generate(model, input_ids, mask, frames=10, penalty=1.7, nq=nq)
    out = model.generate(input_ids, mask, max_new_frames=10, audio_repetition_penalty=1.7, nq=nq)
    assert torch.equal(out.audio_token_ids, expected)
    if seed == 4:  # this case has a row that finishes mid-way
        assert out.num_frames.tolist() == [10, 10, 6] and out.finished_mask.tolist() == [False, False, True]


# ------------------------------------------------------------------------------------------------ stopping, nq


def test_finished_rows_get_pad_frames_and_counts():
    seen_partial = False
    for seed in range(6):
        model = tiny_model(push=0.6, seed=seed)
        input_ids, mask = batch(5, 8, 6, 7)
        out = model.generate(input_ids, mask, max_new_frames=10)
        is_pad = (out.audio_token_ids == PAD).all(-1)  # (B, frames)
        frames = out.audio_token_ids.shape[1]
        for row in range(4):
            count = int(out.num_frames[row])
            assert not is_pad[row, :count].any() and is_pad[row, count:].all()
            assert bool(out.finished_mask[row]) == (count < 10)
        if frames < 10:
            assert out.finished_mask.all()  # generation stops only when no row continues
        seen_partial |= bool(out.finished_mask.any() and (out.num_frames > 0).any() and frames > 0)
    assert seen_partial


def test_all_rows_finishing_immediately_gives_zero_frames():
    model = tiny_model(push=-50.0)
    out = model.generate(*batch(5, 3), max_new_frames=4)
    assert out.audio_token_ids.shape == (2, 0, N_VQ)
    assert out.finished_mask.all() and out.num_frames.tolist() == [0, 0]
    assert [e["type"] for e in model.generate_stream(*batch(5), max_new_frames=4)] == ["final"]


def test_nq_limits_the_generated_channels(model):
    input_ids, mask = batch(6, 8)
    full = model.generate(input_ids, mask, max_new_frames=3)
    part = model.generate(input_ids, mask, max_new_frames=3, nq=2)
    assert (part.audio_token_ids[..., 2:] == PAD).all()
    assert torch.equal(part.audio_token_ids[:, 0, :2], full.audio_token_ids[:, 0, :2])  # same first frame prefix


def test_repetition_penalty_ignores_prompt_codes(model):
    input_ids, mask = batch(9, 7)  # prompts hold audio codes
    plain = model.generate(input_ids, mask, max_new_frames=1)
    penalised = model.generate(input_ids, mask, max_new_frames=1, audio_repetition_penalty=1e4)
    assert torch.equal(plain.audio_token_ids, penalised.audio_token_ids)


def test_bfloat16_model_generates_and_reresolves(model):
    model.set_attention_implementation("flash_attention_2", "eager")
    try:
        model.to(torch.bfloat16)
        out = model.generate(*batch(6), max_new_frames=2)
        assert out.audio_token_ids.shape[0] == 1
        assert model.resolved_attention_implementation() == ("sdpa", "eager")
    finally:
        model.to(torch.float32)
        model.set_attention_implementation("sdpa")


# ------------------------------------------------------------------------------------------------ errors


def test_non_finite_logits_raise(model):
    bad = tiny_model()
    with torch.no_grad():
        bad.audio_embeddings[1].weight[3] = float("nan")  # tied to audio head 1
    text_only = prompt(5, seed=0, audio_rows=0)[None]  # the prompt itself must stay finite
    with pytest.raises(RuntimeError, match="^Non-finite audio logits"):
        bad.generate(text_only, max_new_frames=2)
    with torch.no_grad():
        bad.transformer.wte.weight[7] = float("inf")  # tied text head row of audio_end
    with pytest.raises(RuntimeError, match="^Non-finite text logits"):
        bad.generate(text_only, max_new_frames=2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ids, mask: (ids[..., :3], mask), r"input_ids is \(2, 6, 3\): expected a tensor \[B, T, 5\]"),
        (lambda ids, mask: (ids[0], mask), r"input_ids is \(6, 5\)"),
        (lambda ids, mask: (ids.float(), mask), "integer ids"),
        (lambda ids, mask: (ids.index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])),
                                          torch.tensor(40)), mask),
         r"input_ids\[\.\.\., 3\] \(codebook 2\) holds code 40: allowed 0\.\.15 or 16"),
        (lambda ids, mask: (ids.index_put((torch.tensor([0]), torch.tensor([4]), torch.tensor([0])),
                                          torch.tensor(64)), mask), r"text id 64: allowed 0\.\.63"),
        (lambda ids, mask: (ids, mask[:, 1:]), r"attention_mask is \(2, 5\): expected shape \(2, 6\)"),
        (lambda ids, mask: (ids, mask.flip(-1)), r"rows \[1\] end with padding"),
    ],
)
def test_bad_inputs_are_value_errors(model, mutate, message):
    input_ids, mask = mutate(*batch(6, 3))
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, mask, max_new_frames=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, audio_temperature=0.0), "audio_temperature=0.0 must be > 0 when do_sample=True"),
        (dict(do_sample=True, text_temperature=-1), "text_temperature=-1"),
        (dict(audio_top_p=0.0), r"audio_top_p=0.0 must be within \(0, 1\]"),
        (dict(text_top_p=1.5), "text_top_p=1.5"),
        (dict(audio_repetition_penalty=0.0), "audio_repetition_penalty=0.0 must be > 0"),
        (dict(nq=0), "nq=0 must be >= 1"),
        (dict(nq=5), r"nq=5 must be an integer within 1\.\.4"),
        (dict(max_new_frames=0), "max_new_frames=0 must be >= 1"),
        (dict(max_new_frames=2.5), "max_new_frames=2.5 must be an integer"),
        (dict(do_sample="yes"), "do_sample='yes' must be True or False"),
        (dict(audio_top_k=2.0), "audio_top_k=2.0 must be an integer"),
        (dict(max_new_frames=600), "exceeds max_position_embeddings=512"),
    ],
)
def test_bad_sampling_settings_are_value_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(*batch(4), **kwargs)


def test_unknown_keywords_are_reported_and_ignored(model, caplog):
    with caplog.at_level(logging.WARNING):
        model.generate(*batch(4), max_new_frames=1, return_dict_in_generate=True)
    assert "return_dict_in_generate" in caplog.text


def test_attention_setters(model):
    model._set_attention_implementation("eager", local_attn_implementation="sdpa")
    assert model.get_attention_implementation() == ("eager", "sdpa")
    model.set_attn_implementation("flash_attention_2")  # transformers' name
    assert model.get_attention_implementation() == ("flash_attention_2", "flash_attention_2")
    assert model.resolved_attention_implementation() == ("sdpa", "sdpa")
    with pytest.raises(ValueError, match="local='fast'.*valid"):
        model.set_attention_implementation("sdpa", "fast")
    model.set_attention_implementation("sdpa")


# ------------------------------------------------------------------------------------------------ sampler


def _naive_filter(scores, top_k, top_p):
    scores = scores.clone()
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.sort(scores, descending=True).values[..., top_k - 1 : top_k]
        scores[scores < kth] = float("-inf")
    if top_p < 1:
        values, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(values, -1).cumsum(-1)
        drop = cumulative > top_p
        drop[..., 0] = False
        scores.scatter_(-1, order, values.masked_fill(drop, float("-inf")))
    return scores


@pytest.mark.parametrize("top_k", [0, 1, 3, 25, 100])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 0.01])
def test_top_k_top_p_filter_matches_a_full_sort(top_k, top_p):
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(top_k))
    assert torch.equal(filter_top_k_top_p(scores, top_k, top_p), _naive_filter(scores, top_k, top_p))


def test_greedy_takes_the_first_maximum_and_top_k_one_is_greedy():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert select_tokens(scores, do_sample=False).tolist() == [1, 0]
    scores = torch.randn(8, 30)
    torch.testing.assert_close(select_tokens(scores, do_sample=True, top_k=1), scores.argmax(-1))


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probs.log().expand(20000, 4)
    torch.manual_seed(0)
    counts = torch.bincount(select_tokens(scores, do_sample=True), minlength=4).float() / 20000
    torch.testing.assert_close(counts, probs, atol=0.02, rtol=0)


def test_repetition_penalty_formula():
    scores = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(scores, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert apply_repetition_penalty(scores, seen, 1.0) is scores


def test_sampling_params_are_frozen_and_resolve_nq():
    params = SamplingParams(nq=3)
    assert params.resolve_nq(16) == 3 and SamplingParams().resolve_nq(16) == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.nq = 4
