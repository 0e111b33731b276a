"""The verification run and its report: every check of every (device, dtype) against the CPU float32 reference.

Only deterministic work is compared (sampled audio legitimately differs between devices): global hidden states of
the prompt rows; teacher-forced logits (teacher_forcing.py: the reference prompt rows plus the reference greedy
frames through both decoders); greedy codes (agreement, first divergent frame); codec decode of identical codes (SNR,
max abs difference / peak). A short sampled `model.inference(...)` run (its first frames forced, so that the
model's decision to stop cannot end it) must give finite audio without a float32 retry. Every check captures its own
exceptions (device-side errors included), so one failure never ends the run. The reference and the verdicts:
verification_judges.py; the metrics and the tolerances they are judged by: verification_metrics.py.
`VerificationSettings.compile`: the checked models run the compiled frame step (compiled_step.py); the report names
the step each target ran.
"""

from __future__ import annotations

import datetime
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import compiled_step, devices, environment
from .pipeline import encode_prompt_audio
from .prompting import infer_mode
from .sampling import resolve_nq
from .teacher_forcing import measure_codec, measure_greedy, measure_hidden, measure_logits
from .verification_judges import Outcome, Reference, judge_codec, judge_codes, judge_hidden, judge_logits
from .verification_metrics import TOLERANCES, all_finite, dtype_name, tolerance_for

logger = logging.getLogger(__name__)

REPORT_FORMAT = "moss-tts-nano-verification/1"
SMOKE_MIN_FRAMES = 4  # the smoke run generates at least this many frames (fewer only when max_new_frames is lower)
JSON_NAME = "npu_verification_report.json"
TABLE_NAME = "npu_verification_report.md"
REFERENCE_DEVICE = torch.device("cpu")
REFERENCE_DTYPE = torch.float32
REFERENCE_NOTE = (
    "CPU float32 is the reference: its agreement checks compare it with itself and pass by definition "
    "(finiteness is still checked)"
)
COMPILE_NOTE = (
    "CPU float32 with the eager step is the reference; every target, the CPU float32 one included, runs its checks "
    "with the compiled frame step (its `frame_step` says which step ran)"
)

# ---------------------------------------------------------------------------------------------------- reference
# (the `Reference` itself: verification_judges.py)


@dataclass(frozen=True)
class VerificationSettings:
    """What to synthesise and how long.

    Attributes:
        text: the text of the prompt (short: every check runs it).
        max_new_frames: frames of the greedy and inference runs.
        seed: seed of the sampled inference run.
        nq: codebooks in use (None: all).
        inference_kwargs: sampling settings of the inference smoke run.
        sample_dir: where the smoke run writes `<device>_<dtype>.wav` (None: nothing written).
        compile: the checked models run the compiled frame step (`compiled_step.enable`: inductor on a CPU, graph
            capture on CUDA / NPU; eager where it falls back, with the reason in the target's `frame_step`).
    """

    text: str
    max_new_frames: int = 8
    seed: int = 0
    nq: Optional[int] = None
    inference_kwargs: dict = field(default_factory=dict)
    sample_dir: Optional[Path] = None
    compile: bool = False


@dataclass
class ModelSource:
    """Where models come from.

    Attributes:
        load_model: (device, dtype) -> model on that device in that dtype, eval mode, attention configured.
        load_tools: the CPU float32 model -> (text tokenizer, codec, prompt audio): the prompt audio is a (2, N)
            48 kHz waveform (voice_clone) or None (continuation without prompt).
        description: one line for the report.
    """

    load_model: Callable[[torch.device, torch.dtype], Any]
    load_tools: Callable[[Any], tuple[Any, Any, Optional[torch.Tensor]]]
    description: str


def compute_reference(model: Any, tokenizer: Any, codec: Any, prompt_audio: Optional[torch.Tensor],
                      settings: VerificationSettings) -> Reference:
    """Run every deterministic measurement on the CPU float32 model.

    Raises:
        RuntimeError: when the reference greedy run produces no frame (nothing to compare).
    """
    codec.to(REFERENCE_DEVICE)
    prompt_codes = None if prompt_audio is None else encode_prompt_audio(codec, prompt_audio)
    mode = infer_mode(None, has_prompt_audio=prompt_codes is not None, has_prompt_text=False)
    input_ids, mask = model.build_inference_input_ids(tokenizer, settings.text, mode=mode,
                                                      prompt_audio_codes=prompt_codes, nq=settings.nq)
    input_ids, mask = input_ids.cpu(), mask.cpu()
    nq = resolve_nq(settings.nq, model.config.n_vq)
    hidden, hidden_finite = measure_hidden(model, input_ids, mask)
    codes = measure_greedy(model, input_ids, mask, settings.max_new_frames, nq)
    if codes.shape[0] == 0:
        raise RuntimeError("the reference greedy run chose audio_end at once (no frame to compare); try another --text")
    return Reference(
        input_ids=input_ids, attention_mask=mask, nq=nq, hidden=hidden, hidden_finite=hidden_finite, codes=codes,
        logits=measure_logits(model, input_ids, mask, codes, nq),
        waveform=measure_codec(codec, codes, nq, REFERENCE_DEVICE, REFERENCE_DTYPE),
        prompt_frames=0 if prompt_codes is None else int(prompt_codes.shape[0]),
    )


def run_inference_smoke(model: Any, tokenizer: Any, codec: Any, prompt_audio: Optional[torch.Tensor],
                        settings: VerificationSettings, label: str) -> Outcome:
    """A short sampled `model.inference` run: it must give its frames as finite audio without a float32 retry.

    It checks that sampling and decoding work on the device, not when the model chooses to stop: the first
    `smoke_frames(settings)` frames are forced (min_new_frames), so a checkpoint that ends at once still runs.
    """
    path = None if settings.sample_dir is None else settings.sample_dir / f"{label}.wav"
    minimum = smoke_frames(settings)
    result = model.inference(settings.text, path, text_tokenizer=tokenizer, audio_tokenizer=codec,
                             prompt_audio=prompt_audio, max_new_frames=settings.max_new_frames,
                             seed=settings.seed, nq=settings.nq, min_new_frames=minimum, **settings.inference_kwargs)
    waveform, frames = result["waveform"], int(result["frames"])
    finite = all_finite(waveform)
    fallback = bool(result["float32_fallback"])  # a retry means the dtype itself failed numerically
    metrics = {"frames": frames, "min_frames": minimum, "seconds_of_audio": waveform.shape[-1] / result["sample_rate"],
               "waveform_finite": finite, "float32_fallback": fallback, "audio_path": result["audio_path"]}
    problems = []
    if frames < minimum:
        problems.append(f"the model ended after {frames} frames although {minimum} were forced")
    if not finite:
        problems.append("the waveform has NaN or Inf samples")
    if fallback:
        problems.append("generation failed numerically and only the float32 retry succeeded")
    return Outcome(not problems, metrics, "; ".join(problems) or None)


def smoke_frames(settings: VerificationSettings) -> int:
    """Frames the smoke run always generates: a few, never more than it may generate."""
    return min(SMOKE_MIN_FRAMES, settings.max_new_frames)


# ---------------------------------------------------------------------------------------------------- checks


@dataclass
class CheckResult:
    """One check of one (device, dtype)."""

    name: str
    passed: bool
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    note: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 3), "error": self.error,
                "note": self.note, **self.metrics}


def _describe_error(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def run_check(name: str, device: Optional[torch.device], body: Callable[[], Outcome]) -> tuple[CheckResult, Any]:
    """Run one check, synchronising the device inside it so asynchronous device errors land on this check.

    Returns:
        (the result, the outcome's value or None). Exceptions become a failed result with the error text.
    """
    start = time.perf_counter()
    try:
        outcome = body()
        if device is not None:
            devices.synchronize(device)
    except Exception as exc:  # noqa: BLE001  (every failure is reported, the run goes on)
        logger.debug("check %s failed", name, exc_info=True)
        return CheckResult(name, False, time.perf_counter() - start, error=_describe_error(exc)), None
    result = CheckResult(name, bool(outcome.passed), time.perf_counter() - start, outcome.metrics, note=outcome.note)
    return result, outcome.value


def _skipped(name: str, reason: str) -> CheckResult:
    return CheckResult(name, False, error=f"not run: {reason}")


# ---------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One requested (device, dtype); `unavailable` holds the reason when the device cannot be used."""

    spec: str
    device: Optional[torch.device]
    dtype: Optional[torch.dtype]
    unavailable: Optional[str] = None

    @property
    def is_reference(self) -> bool:
        return self.device == REFERENCE_DEVICE and self.dtype == REFERENCE_DTYPE

    @property
    def label(self) -> str:
        """File-name-safe `<device>_<dtype>`."""
        return f"{self.device or self.spec}_{dtype_name(self.dtype) if self.dtype else 'none'}".replace(":", "-")


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class TargetResult:
    """Every check of one target; it passes when the device was available and every check passed."""

    target: Target
    checks: list[CheckResult] = field(default_factory=list)
    device_name: Optional[str] = None
    frame_step: Optional[str] = None  # `compiled_step.status` after the checks: eager, compiled or captured (why)

    @property
    def passed(self) -> bool:
        return self.target.unavailable is None and bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        target = self.target
        return {
            "device": str(target.device) if target.device is not None else target.spec,
            "requested": target.spec,
            "dtype": dtype_name(target.dtype) if target.dtype is not None else None,
            "available": target.unavailable is None,
            "error": target.unavailable,
            "device_name": self.device_name,
            "is_reference": target.is_reference,
            "passed": self.passed,
            "frame_step": self.frame_step,
            "checks": {check.name: check.to_dict() for check in self.checks},
        }


@dataclass
class _Context:
    source: ModelSource
    settings: VerificationSettings
    tokenizer: Any = None
    codec: Any = None
    prompt_audio: Optional[torch.Tensor] = None
    reference: Optional[Reference] = None
    reference_error: Optional[str] = None
    reference_seconds: float = 0.0


AGREEMENT_CHECKS = ("hidden_states", "teacher_forced_logits", "greedy_codes", "codec_decode")


def _agreement_bodies(model: Any, target: Target, context: _Context) -> dict[str, Callable[[], Outcome]]:
    ref, tol = context.reference, tolerance_for(target.dtype)
    if _self_compared(target, context):  # compare the reference with itself: only finiteness can fail
        return {
            "hidden_states": lambda: judge_hidden(ref.hidden, ref.hidden_finite, ref, tol),
            "teacher_forced_logits": lambda: judge_logits(ref.logits, ref, tol),
            "greedy_codes": lambda: judge_codes(ref.codes, ref, tol),
            "codec_decode": lambda: judge_codec(ref.waveform, ref, tol),
        }
    ids, mask, nq = ref.input_ids, ref.attention_mask, ref.nq
    return {
        "hidden_states": lambda: judge_hidden(*measure_hidden(model, ids, mask), ref, tol),
        "teacher_forced_logits": lambda: judge_logits(measure_logits(model, ids, mask, ref.codes, nq), ref, tol),
        "greedy_codes": lambda: judge_codes(
            measure_greedy(model, ids, mask, context.settings.max_new_frames, nq), ref, tol),
        "codec_decode": lambda: judge_codec(
            measure_codec(context.codec, ref.codes, nq, target.device, target.dtype), ref, tol),
    }


def _self_compared(target: Target, context: _Context) -> bool:
    """The reference target compares the reference with itself, unless its checks run the compiled step."""
    return target.is_reference and not context.settings.compile


def _checks_on_model(model: Any, target: Target, context: _Context) -> list[CheckResult]:
    results = []
    if context.settings.compile:
        compiled_step.enable(model)  # after the reference: that one is computed with the eager step
    if context.reference is None:
        reason = f"no CPU float32 reference ({context.reference_error})"
        results = [_skipped(name, reason) for name in AGREEMENT_CHECKS]
    else:
        for name, body in _agreement_bodies(model, target, context).items():
            result, _ = run_check(name, target.device, body)
            if _self_compared(target, context):
                result.note = REFERENCE_NOTE
            results.append(result)
    if context.tokenizer is None:
        results.append(_skipped("inference", f"no tokenizer/codec ({context.reference_error})"))
        return results
    smoke = lambda: run_inference_smoke(model, context.tokenizer, context.codec, context.prompt_audio,  # noqa: E731
                                        context.settings, target.label)
    results.append(run_check("inference", target.device, smoke)[0])
    return results


def _load_check(target: Target, context: _Context) -> tuple[CheckResult, Any]:
    def body() -> Outcome:
        model = context.source.load_model(target.device, target.dtype)
        plan = model.kernel_plan()
        global_impl, local_impl = plan.attention
        parameter = next(model.parameters())
        kernels = plan.describe()  # which path this device runs, e.g. rope "complex (cpu fast path)" / "real"
        metrics = {"attention": {"global": global_impl, "local": local_impl}, "rope": kernels["rope"],
                   "linear": kernels["linear"], "rope_reason": plan.reasons.get("rope"),
                   "attention_reason": plan.reasons.get("attention"), "parameter_dtype": dtype_name(parameter.dtype),
                   "parameter_device": str(parameter.device)}
        return Outcome(parameter.dtype == target.dtype, metrics, value=model)

    return run_check("load", target.device, body)


def _device_name(device: torch.device) -> Optional[str]:
    try:
        return environment.describe_environment(device)["device_name"]
    except Exception as exc:  # noqa: BLE001  (a name is nice to have, never worth failing for)
        return f"unknown ({_describe_error(exc)})"


def _verify_target(target: Target, context: _Context,
                   preloaded: Optional[tuple[CheckResult, Any]] = None) -> TargetResult:
    """Load the model (or take `preloaded` (load result, model or None)) and run every check on one target."""
    result = TargetResult(target)
    if target.unavailable is not None:
        return result
    result.device_name = _device_name(target.device)
    load, model = preloaded if preloaded is not None else _load_check(target, context)
    result.checks.append(load)
    if model is None:
        result.checks += [_skipped(name, "the model did not load") for name in AGREEMENT_CHECKS + ("inference",)]
        return result
    try:
        result.checks += _checks_on_model(model, target, context)
        result.frame_step = compiled_step.status(model)
    finally:
        del model
        gc.collect()
    return result


def _prepare_reference(context: _Context) -> tuple[CheckResult, Any]:
    """Load the CPU float32 model, its tokenizer and codec, and compute the reference (errors are recorded)."""
    started = time.perf_counter()
    load, model = _load_check(Target("cpu", REFERENCE_DEVICE, REFERENCE_DTYPE), context)
    if model is None:
        context.reference_error = f"the CPU float32 model did not load: {load.error}"
        return load, None
    try:
        context.tokenizer, context.codec, context.prompt_audio = context.source.load_tools(model)
        context.reference = compute_reference(model, context.tokenizer, context.codec, context.prompt_audio,
                                              context.settings)
    except Exception as exc:  # noqa: BLE001  (reported; the other targets still load and run)
        logger.debug("reference failed", exc_info=True)
        context.reference_error = _describe_error(exc)
    context.reference_seconds = time.perf_counter() - started
    return load, model


def run_verification(targets: Sequence[Target], source: ModelSource, settings: VerificationSettings) -> dict[str, Any]:
    """Compute the CPU float32 reference, verify every target, and return the report (a JSON-ready dict).

    Args:
        targets: the (device, dtype) pairs; unavailable ones are reported as failed.
        source: how to load models, tokenizer, codec and prompt audio.
        settings: text, frames, seed, sampling of the smoke run.

    Returns:
        The report: format, created_utc, overall_pass, model, settings, environment, reference, tolerances,
        results (one per target), summary. Exceptions of single checks are recorded there, never raised.
    """
    context = _Context(source, settings)
    results: dict[int, TargetResult] = {}
    if any(t.unavailable is None for t in targets):
        preloaded = _prepare_reference(context)
        for index, target in enumerate(targets):
            if target.is_reference:  # reuse the reference model rather than loading it twice
                results[index] = _verify_target(target, context, preloaded)
        del preloaded
        gc.collect()
    else:
        context.reference_error = "not computed: no requested device is available"
    for index, target in enumerate(targets):
        if index not in results:
            results[index] = _verify_target(target, context)
    return _build_report([results[i] for i in range(len(targets))], context)


def _environment(results: Sequence[TargetResult]) -> dict[str, Any]:
    """environment.describe_environment of the first accelerator verified (else the CPU): versions and device name."""
    accelerators = [r.target.device for r in results if r.target.device is not None and r.target.device.type != "cpu"]
    try:
        return environment.describe_environment(accelerators[0] if accelerators else REFERENCE_DEVICE)
    except Exception as exc:  # noqa: BLE001  (the report must still be written)
        return {"error": _describe_error(exc), **environment.describe_environment(REFERENCE_DEVICE)}


def _build_report(results: Sequence[TargetResult], context: _Context) -> dict[str, Any]:
    reference, settings = context.reference, context.settings
    return {
        "format": REPORT_FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "overall_pass": bool(results) and all(r.passed for r in results),
        "model": context.source.description,
        "settings": {"text": settings.text, "max_new_frames": settings.max_new_frames, "seed": settings.seed,
                     "nq": settings.nq, "inference_sampling": settings.inference_kwargs, "compile": settings.compile,
                     "mode": None if context.tokenizer is None else
                     "continuation" if context.prompt_audio is None else "voice_clone"},
        "environment": _environment(results),
        "reference": {
            "device": str(REFERENCE_DEVICE), "dtype": dtype_name(REFERENCE_DTYPE), "ok": reference is not None,
            "error": context.reference_error, "seconds": round(context.reference_seconds, 3),
            "note": COMPILE_NOTE if settings.compile else REFERENCE_NOTE,
            "prompt_rows": None if reference is None else int(reference.input_ids.shape[1]),
            "prompt_frames": None if reference is None else reference.prompt_frames,
            "greedy_frames": None if reference is None else int(reference.codes.shape[0]),
        },
        "tolerances": {name: asdict(tol) for name, tol in TOLERANCES.items()},
        "results": [r.to_dict() for r in results],
        "summary": {"targets": len(results), "passed": sum(r.passed for r in results),
                    "unavailable": sum(r.target.unavailable is not None for r in results)},
    }
