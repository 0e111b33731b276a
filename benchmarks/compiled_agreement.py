"""Greedy codes of the compiled frame step (compiled_step.py, inductor) against the eager step.

    python benchmarks/compiled_agreement.py [--frames 100] [--output benchmarks/results/compiled_agreement.json]

- the golden tts_tiny fixture (../shared/golden, when present): greedy codes, repetition penalty 1.2, KV cache on,
  compiled, against the recorded upstream codes;
- the released architecture with seeded random weights (`demo.build_demo_assets`): `--frames` greedy frames from a
  150-row voice-clone prompt, eager and compiled, compared code by code; then the teacher-forced logits of those
  frames through the compiled frame against eager's, judged by verify_npu's float32 tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from measuring import add_run_arguments, apply_threads, cpu_info, load_average, write_report  # noqa: E402

import compiled_step  # noqa: E402
from benchmark import voice_clone_prompt  # noqa: E402
from demo import build_demo_assets  # noqa: E402
from modeling_moss_tts_nano import MossTTSNanoForCausalLM  # noqa: E402
from teacher_forcing import teacher_forced_logits  # noqa: E402
from verification_metrics import cosine_similarity, max_abs_difference, tolerance_for  # noqa: E402

GOLDEN = ROOT.parent / "shared" / "golden" / "tts_tiny"


def _generate(model, input_ids, mask, frames: int, compiled: bool) -> tuple[torch.Tensor, float]:
    if compiled:
        compiled_step.enable(model)
    else:
        compiled_step.disable(model)
    start = time.perf_counter()
    out = model.generate(input_ids, mask, max_new_frames=frames, do_sample=False, audio_repetition_penalty=1.2)
    return out.audio_token_ids, time.perf_counter() - start


def golden_check() -> dict:
    if not (GOLDEN / "golden.npz").exists():
        return {"skipped": f"{GOLDEN} is absent"}
    golden = dict(np.load(GOLDEN / "golden.npz"))
    model = MossTTSNanoForCausalLM.from_pretrained(str(GOLDEN)).eval()
    model.set_attention_implementation("sdpa")
    ids, mask = torch.from_numpy(golden["batch_input_ids"]), torch.from_numpy(golden["batch_attention_mask"])
    codes, seconds = _generate(model, ids, mask, 12, compiled=True)
    expected = torch.from_numpy(golden["greedy_sdpa_kv1"])
    return {"equal": bool(torch.equal(codes, expected)), "codes": int(expected.numel()),
            "status": compiled_step.status(model), "first_call_s": seconds}


def released_check(frames: int) -> dict:
    assets = build_demo_assets(seed=0)
    ids, mask = voice_clone_prompt(assets)
    eager, eager_s = _generate(assets.model, ids, mask, frames, compiled=False)
    _generate(assets.model, ids, mask, 2, compiled=True)  # compile (not timed)
    compiled, compiled_s = _generate(assets.model, ids, mask, frames, compiled=True)
    same = eager.shape == compiled.shape
    agree = int((eager == compiled).sum()) if same else 0
    return {"frames": [int(eager.shape[1]), int(compiled.shape[1])], "equal": bool(same and torch.equal(eager, compiled)),
            "codes_agreeing": agree, "codes": int(eager.numel()), "eager_s": eager_s, "compiled_s": compiled_s,
            "status": compiled_step.status(assets.model),
            "teacher_forced_logits": teacher_forced_check(assets.model, ids, mask, eager)}


def teacher_forced_check(model, input_ids, mask, codes: torch.Tensor) -> dict:
    """Teacher-forced logits of `codes` through the compiled frame (the model's setting) against eager's."""
    eager = teacher_forced_logits(model, input_ids, mask, codes, compile=False)
    start = time.perf_counter()
    graphed = teacher_forced_logits(model, input_ids, mask, codes)
    report = {"step": graphed.step, "first_call_s": time.perf_counter() - start, "frames": int(codes.shape[1])}
    tolerance = tolerance_for("float32")
    within = graphed.step != "eager"
    for kind in ("text", "audio"):
        reference, logits = getattr(eager, kind), getattr(graphed, kind)
        cosine = cosine_similarity(reference, logits)
        relative = max_abs_difference(reference, logits) / max(1.0, float(reference.abs().max()))
        report.update({f"{kind}_cosine": cosine, f"{kind}_max_abs_rel": relative})
        within = within and cosine >= tolerance.min_cosine and relative <= tolerance.max_abs_rel
    agreement = float((graphed.argmax_codes() == eager.argmax_codes()).double().mean())
    report.update(argmax_agreement=agreement,
                  within_float32_tolerance=within and agreement >= tolerance.min_argmax_agreement)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    add_run_arguments(parser, output=str(ROOT / "benchmarks" / "results" / "compiled_agreement.json"),
                      weight_precision=False)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    report = {"torch": torch.__version__, "cpu_model": cpu_info("model name"), "threads": torch.get_num_threads(),
              "load_average_at_start": load_average()}
    with torch.no_grad():
        report["golden_tts_tiny"] = golden_check()
        report["released_architecture_random_weights"] = released_check(args.frames)
    report["load_average_at_end"] = load_average()
    write_report(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
