"""The engine core's parts on their own: the scheduler's admission, budget and cancellation, the decode windows, and
the core's frame step against the model's own generate (private core) on a tiny model."""

from __future__ import annotations

import pytest
import torch

from codec_output import STREAM_MAX_WINDOW, window_frames
from engine_core import EngineCore
from model_runner import ModelRunner, RowInput
from pipeline_assets import tiny_tts
from sampling import SamplingParams
from scheduler import EngineFull, Request, Scheduler

PARAMS = SamplingParams(max_new_frames=4)


def _request(name: str, rows: torch.Tensor = None, params: SamplingParams = PARAMS) -> Request:
    return Request(name, params, None, 1, lambda index, codes: rows, 16)


def test_admission_is_first_come_first_served_within_slots_and_budget():
    scheduler = Scheduler(slots=3, max_queue=2, budget=2)
    first, second, third = (_request(n) for n in "abc")
    scheduler.add(first)
    scheduler.add(second)
    with pytest.raises(EngineFull, match="max_queue=2"):
        scheduler.add(third)
    assert [r.id for r in scheduler.schedule()] == ["a", "b"] and (first.slot, second.slot) == (0, 1)
    scheduler.add(third)
    assert [r.id for r in scheduler.schedule()] == ["a", "b"]  # the budget (2 rows) is full: c waits
    scheduler.finish(first)
    assert [r.id for r in scheduler.schedule()] == ["b", "c"] and third.slot == 0  # the freed slot


def test_out_of_memory_budget_halves_and_never_grows():
    scheduler = Scheduler(slots=8)
    requests = [_request(str(i)) for i in range(8)]
    assert scheduler.shrink(8) == 4 and scheduler.shrink(4) == 2 and scheduler.shrink(8) == 1
    assert scheduler.shrink(1) == 1
    assert [len(block) for block in scheduler.blocks(requests)] == [1] * 8


def test_abort_removes_a_waiting_request_and_marks_a_running_one():
    scheduler = Scheduler(slots=1)
    running, waiting = _request("run"), _request("wait")
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert scheduler.abort("wait") is waiting and waiting.cancelled and not scheduler.waiting
    assert scheduler.abort("run") is running and running.cancelled and scheduler.running == [running]
    assert scheduler.abort("unknown") is None


def test_decode_windows_depend_only_on_the_frames_decoded():
    windows, decoded = [], 0
    while decoded < 40:
        windows.append(window_frames(decoded))
        decoded += windows[-1]
    assert windows[:5] == [1, 1, 2, 4, STREAM_MAX_WINDOW] and set(windows[4:]) == {STREAM_MAX_WINDOW}


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_a_step_of_several_slots_equals_each_sequence_alone(batch_invariant):
    """Greedy codes of sequences of different lengths stepped together equal each one stepped alone."""
    from test_model_generation import prompt, tiny_model

    model = tiny_model(push=1.0, seed=3, n_layer=2)
    params = SamplingParams(max_new_frames=8, audio_repetition_penalty=1.7)
    prompts = [prompt(n, seed) for seed, n in enumerate((5, 11, 7))]

    def run(slots: list[int], rows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        runner = ModelRunner(model, 4, batch_invariant=batch_invariant, batched_products_mode=True)
        for slot, item in zip(slots, rows):
            runner.begin(slot, item.shape[0] + 8)
        codes = [[] for _ in rows]
        for step in range(8):
            result = runner.step([RowInput(slot, item if step == 0 else None, params, None, True)
                                  for slot, item in zip(slots, rows)])
            for i in range(len(rows)):
                codes[i].append(result.codes[i])
        return codes

    together = run([0, 1, 2], prompts)
    apart = [run([3], [item])[0] for item in prompts]
    for mine, alone in zip(together, apart):
        assert all(torch.equal(a, b) for a, b in zip(mine, alone))


def test_generate_is_a_private_core_of_one_request_per_row():
    model = tiny_tts()
    rows = torch.cat((torch.randint(3, 60, (2, 6, 1)), torch.full((2, 6, 16), 1024)), dim=2)
    out = model.generate(rows, max_new_frames=3)
    core = EngineCore(model, slots=2)
    requests = [_request(str(i), rows[i], SamplingParams(max_new_frames=3)) for i in range(2)]
    for request in requests:
        core.add(request)
    while core.has_work:
        core.step()
    for i, request in enumerate(requests):
        frames = int(out.num_frames[i])
        expected = request.codes[0]
        assert torch.equal(out.audio_token_ids[i, :frames], expected)
