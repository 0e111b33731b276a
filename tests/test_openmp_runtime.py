"""openmp_runtime releases the calling thread's idle OpenMP team: with the real GNU OpenMP runtime of this torch (the
process's thread count drops by the team's pooled threads, the thread's next parallel op builds it again with the
same result), the libraries it finds in a crafted /proc/self/maps, its refusal of a runtime without OpenMP 5.0, the
engine's two call sites (the submitting thread, the worker when it goes idle) and the end of every private call."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import engine as engine_module
import engine_core
import openmp_runtime
import pipeline
from engine import SynthesisEngine
from pipeline_assets import TinyAssets

ROOT = Path(__file__).resolve().parents[1]

# In a fresh process (no other thread lives), with torch's two threads: the thread count after a parallel op, after
# the release, after the next parallel op; the op's results; and the same from a second thread.
CHILD = r'''
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
__import__("repo_imports").install()
import torch
torch.set_num_threads(2)
import openmp_runtime
def tasks():
    return len(os.listdir("/proc/self/task"))
def run():
    x = torch.arange(1 << 22, dtype=torch.float32)
    first = float((x * 2).sum())
    held = tasks()
    released = openmp_runtime.release_idle_team()
    after = tasks()
    again = float((x * 2).sum())
    return {"held": held, "released": released, "after": after, "rebuilt": tasks(), "same": first == again,
            "threads": torch.get_num_threads()}
out = {"reason": openmp_runtime.unavailable_reason(), "main": run()}
box = {}
thread = threading.Thread(target=lambda: box.update(value=run()))
thread.start(); thread.join()
out["thread"] = box["value"]
print(json.dumps(out))
'''


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(openmp_runtime, "_pauses", None)
    monkeypatch.setattr(openmp_runtime, "_why_not", "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP and /proc/self/task: Linux only")
@pytest.mark.skipif(os.cpu_count() is None or os.cpu_count() < 2, reason="one CPU: torch makes no OpenMP team")
def test_release_frees_the_threads_team_and_the_next_op_builds_it_again_real_runtime():
    proc = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["reason"]:
        pytest.skip(f"this torch's OpenMP cannot release a team: {out['reason']}")
    for where in ("main", "thread"):
        run = out[where]
        assert run["threads"] == 2 and run["released"] is True and run["same"] is True, (where, run)
        assert run["after"] == run["held"] - 1, (where, run)  # its one pooled thread exited
        assert run["rebuilt"] == run["held"], (where, run)  # and came back with the next parallel op


def test_finds_each_gnu_openmp_in_a_crafted_maps_file(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 11 /venv/torch/lib/libgomp-a34b3233.so.1\n"
        "7f01-7f02 r--p 00001000 08:01 11 /venv/torch/lib/libgomp-a34b3233.so.1\n"
        "7f02-7f03 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n"
        "7f03-7f04 r-xp 00000000 08:01 13 /opt/my libs/libgomp.so.1\n"
        "7f04-7f05 r-xp 00000000 08:01 14 /usr/lib/libgompish-notes.txt\n"
        "7f05-7f06 r-xp 00000000 08:01 15 /usr/lib/libiomp5.so\n"
        "7f06-7f07 rw-p 00000000 00:00 0 \n"
        "7f07-7f08 r-xp 00000000 08:01 16 /usr/lib/libc.so.6\n")
    assert openmp_runtime._mapped_gnu_openmp(str(maps)) == [
        "/opt/my libs/libgomp.so.1", "/usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",
        "/venv/torch/lib/libgomp-a34b3233.so.1"]
    assert openmp_runtime._mapped_gnu_openmp(str(tmp_path / "missing")) == []


def test_a_runtime_without_openmp_5_is_left_alone_with_a_reason(fresh_state, monkeypatch):
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand for a libgomp without omp_pause_resource_all")
    monkeypatch.setattr(openmp_runtime, "_mapped_gnu_openmp", lambda: [libm])
    assert openmp_runtime.release_idle_team() is False
    assert "has no omp_pause_resource_all" in openmp_runtime.unavailable_reason()


def test_no_gnu_openmp_loaded_is_a_no_op_with_a_reason(fresh_state, monkeypatch):
    monkeypatch.setattr(openmp_runtime, "_mapped_gnu_openmp", lambda: [])
    assert openmp_runtime.release_idle_team() is False
    assert openmp_runtime.unavailable_reason() == "no GNU OpenMP runtime is loaded in this process"


def test_engine_releases_the_submitters_team_and_its_own_when_idle(tmp_path, monkeypatch):
    assets = TinyAssets(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_idle_team", lambda: calls.append(threading.current_thread().name))
    with SynthesisEngine(assets.model, **assets.resources(), max_batch_size=2) as engine:
        with engine._cond:  # the worker takes both at once: it has no idle moment between them
            first = engine.submit("Hello world.", prompt_audio=assets.prompt_audio, max_new_frames=4)
            second = engine.submit("A second one.", prompt_audio=assets.prompt_audio, max_new_frames=9)
        assert calls[:2] == [threading.current_thread().name] * 2  # each submit, in the submitting thread
        first.result(timeout=120)
        second.result(timeout=120)
        for _ in range(200):
            if "moss-tts-engine" in calls:
                break
            threading.Event().wait(0.01)
    worker_calls = [name for name in calls if name == "moss-tts-engine"]
    # Once, when both had finished: not when the first finished while the second still ran, not at every step.
    assert worker_calls == ["moss-tts-engine"], calls


def test_every_private_call_releases_its_threads_team_at_its_end(tmp_path, monkeypatch):
    assets = TinyAssets(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(pipeline, "release_idle_team", lambda: calls.append(threading.current_thread().name))
    kwargs = dict(assets.resources(), prompt_audio=assets.prompt_audio, max_new_frames=4)

    def in_thread(name, work):
        thread = threading.Thread(target=work, name=name)
        thread.start()
        thread.join()

    in_thread("caller-a", lambda: assets.model.inference("Hello world.", **kwargs))
    assert calls == ["caller-a"]
    in_thread("caller-b", lambda: list(assets.model.inference_stream("Hello world.", **kwargs)))
    assert calls == ["caller-a", "caller-b"]

    def leave_early():
        stream = assets.model.inference_stream("Hello world.", **kwargs)
        next(stream)
        assert calls == ["caller-a", "caller-b"]  # not while the stream runs
        stream.close()

    in_thread("caller-c", leave_early)
    assert calls[-1] == "caller-c"
    with pytest.raises(ValueError):
        assets.model.inference("Hello world.", **dict(kwargs, max_new_frames=0))
    assert calls[-1] == threading.current_thread().name  # a failed call too


def test_generate_and_generate_stream_release_their_threads_team_at_their_end(tmp_path, monkeypatch):
    assets = TinyAssets(tmp_path)
    calls: list[str] = []
    monkeypatch.setattr(engine_core, "release_idle_team", lambda: calls.append(threading.current_thread().name))
    model, me = assets.model, threading.current_thread().name
    input_ids, mask = model.build_inference_input_ids(assets.tokenizer, "Hello world.")
    model.generate(input_ids, mask, max_new_frames=3)
    assert calls == [me]
    stream = model.generate_stream(input_ids, mask, max_new_frames=3)
    next(stream)
    assert calls == [me]  # not while the stream runs
    stream.close()
    assert calls == [me, me]
