"""What infer_npu.py and verify_npu.py share: model flags, sampling flags, model loading and the error boundary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from . import compiled_step, devices, environment
from .codec_loading import WEIGHT_FILES, check_loading_info, fetch_snapshot, is_hub_id, quiet_transformers
from .attention import ATTENTION_IMPLEMENTATIONS
from .linear_kernels import WEIGHT_PRECISIONS
from .torch_compat import load_pickled_weights, pickled_weights_problem
from .sampling import SamplingParams
from .value_bounds import SAMPLING_BOUNDS, Bound, bound_error, seed_error

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32")
# The official command-line defaults (docs/model.md, Generation), not upstream's method defaults.
CLI_SAMPLING_DEFAULTS = {
    "do_sample": True,
    "text_temperature": 1.0,
    "text_top_p": 1.0,
    "text_top_k": 50,
    "audio_temperature": 0.8,
    "audio_top_p": 0.95,
    "audio_top_k": 25,
    "audio_repetition_penalty": 1.2,
}
CLI_MAX_NEW_FRAMES = 375
CLI_VOICE_CLONE_MAX_TEXT_TOKENS = 75


class UsageError(ValueError):
    """A command-line argument that argparse rejected."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (exit code 2 through run_cli), not usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if all(hasattr(parsed, name) for name in CLI_SAMPLING_DEFAULTS):
            try:  # the rules that join flags (a temperature must be > 0 when sampling), as the library checks them
                sampling_kwargs(parsed)
            except ValueError as exc:  # "audio_temperature=0.0 must be ...": name the flag
                self.error(f"argument --{str(exc).split('=', 1)[0].replace('_', '-')}: {exc}")
        return parsed, rest


def _bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got '{text}'") from None
        problem = bound_error(value, low, high, low_open, shown=text)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _setting(bound: Bound) -> Callable:
    """The flag type of a generation setting: its kind and, unless it holds only when sampling, its range."""
    if bound.sampling_only:  # checked against --do-sample once every flag is parsed (Parser.parse_known_args)
        return _bounded(bound.kind)
    return _bounded(bound.kind, bound.low, bound.high, bound.low_open)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got '{text}'") from None
    problem = seed_error(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model-path", help="checkpoint directory in the official format, or a hub id")
    group.add_argument("--audio-tokenizer-path", help="codec directory or hub id (default: from the checkpoint)")
    group.add_argument("--device", default="auto", help="auto (npu > cuda > cpu), npu, npu:N, cuda, cuda:N or cpu")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="auto: float16 on NPU, bfloat16 (else float16) on CUDA, float32 on CPU")
    group.add_argument("--attn-implementation", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                       help="attention backend for both decoders (auto picks per device)")
    group.add_argument("--demo", action="store_true",
                       help="no download: released architectures with seeded random weights (output is noise)")
    group.add_argument("--local-files-only", action="store_true", help="never download (also HF_HUB_OFFLINE=1)")
    group.add_argument("--seed", type=_seed, default=0, help="random seed, an int in [0, 2**32) (default 0)")
    group.add_argument("--verbose", action="store_true", help="show tracebacks and debug logging")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    d = CLI_SAMPLING_DEFAULTS
    bounded = {name: _setting(bound) for name, bound in SAMPLING_BOUNDS.items()}
    group = parser.add_argument_group("generation (defaults: the official CLI values)")
    group.add_argument("--do-sample", type=_boolean, nargs="?", const=True, default=d["do_sample"],
                       help="sample (true, default) or decode greedily (false)")
    for name in ("text_temperature", "text_top_p", "text_top_k", "audio_temperature", "audio_top_p", "audio_top_k",
                 "audio_repetition_penalty"):
        group.add_argument("--" + name.replace("_", "-"), type=bounded[name], default=d[name])
    group.add_argument("--max-new-frames", type=bounded["max_new_frames"], default=None,
                       help=f"frames to generate at most (12.5 per second; default {CLI_MAX_NEW_FRAMES})")
    group.add_argument("--nq", type=_bounded(int, 1, 16), default=None, help="codebooks to use (1..16, default all)")
    group.add_argument("--voice-clone-max-text-tokens", type=_bounded(int, 1),
                       default=CLI_VOICE_CLONE_MAX_TEXT_TOKENS, help="token budget of one voice-clone text chunk")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation keywords the flags give, checked by ``SamplingParams`` (ValueError naming the setting)."""
    kwargs = {name: getattr(args, name) for name in CLI_SAMPLING_DEFAULTS}
    kwargs["max_new_frames"] = args.max_new_frames or CLI_MAX_NEW_FRAMES
    kwargs["nq"] = args.nq
    SamplingParams(**kwargs)
    return kwargs


def check_model_directory(path: Path) -> None:
    """Raise ValueError naming what a checkpoint directory lacks (config, weights, tokenizer)."""
    if not path.is_dir():
        raise ValueError(f"--model-path '{path}' is not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES)})")
    if not (path / "tokenizer.model").is_file():
        missing.append("tokenizer.model")
    if missing:
        raise ValueError(f"model directory '{path}' is missing {', '.join(missing)}")


def resolve_model_path(model_path: str | None, local_files_only: bool) -> Path:
    if not model_path:
        raise ValueError("no model given: pass --model-path DIR (a checkpoint directory or hub id) or --demo")
    path = Path(model_path).expanduser()
    if not path.exists() and is_hub_id(model_path):
        path = fetch_snapshot(model_path, local_files_only, "the checkpoint", "--model-path")
    check_model_directory(path)
    return path


def _model_class() -> Any:
    from .modeling_moss_tts_nano import MossTTSNanoForCausalLM
    return MossTTSNanoForCausalLM


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes stored in a checkpoint directory, read without loading the tensors."""
    files = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            files += sorted({path / f for f in json.loads((path / index).read_text())["weight_map"].values()})
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                shapes.update({k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()})
        else:
            state = load_pickled_weights(str(file), map_location="meta", mmap=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def first_shape_mismatch(path: Path) -> str | None:
    """Describe the first tensor whose stored shape differs from what config.json describes, if any."""
    model_class = _model_class()
    try:
        config = model_class.config_class.from_pretrained(str(path))
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
        stored = _checkpoint_shapes(path)
    except Exception:  # the caller reports the original loading error instead
        return None
    for key, shape in stored.items():
        if key in expected and expected[key] != shape:
            return f"{key} is {list(shape)} in the checkpoint but {list(expected[key])} in config.json"
    return None


def load_checkpoint(path: Path, dtype: torch.dtype) -> Any:
    """Load our model class from an official-format directory, rewording loading failures as one line.

    A folder with only pickled weights on torch < 2.6 is an environment problem (RuntimeError with the remedy).
    """
    weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), path)
    problem = pickled_weights_problem(path)
    if problem is not None:
        raise RuntimeError(problem)
    try:
        with quiet_transformers():
            model, info = _model_class().from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except Exception as exc:  # safetensors, torch and transformers each raise their own types for a bad file
        mismatch = first_shape_mismatch(path)
        if mismatch:
            raise ValueError(f"weights in '{weights}' do not match the architecture in config.json: {mismatch}") from exc
        text = str(exc)
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"cannot load the checkpoint '{weights}': {type(exc).__name__}: {reason}") from exc
    check_loading_info(info, path)
    return model.eval()


def load_model_for_cli(args: argparse.Namespace, path: Path | None = None) -> tuple[Any, dict]:
    """Build or load the model on the requested device; return it and the resource kwargs for inference.

    ``path`` is the checkpoint directory already resolved by ``resolve_model_path`` (resolved here when None).
    """
    environment.apply_npu_environment_defaults()
    device = devices.resolve_device(args.device)
    devices.use_device_in_this_thread(device)  # the script's own thread: streams and workspaces on that card
    dtype = devices.resolve_dtype(args.dtype, device)
    if args.demo:
        from .demo import build_demo_assets
        assets = build_demo_assets(args.seed)
        model = assets.model.to(device=device, dtype=dtype)
        resources = {"text_tokenizer": assets.tokenizer, "audio_tokenizer": assets.codec,
                     "prompt_audio": assets.prompt_audio, "_demo_workdir": assets.workdir}
    else:
        path = path or resolve_model_path(args.model_path, args.local_files_only)
        model = load_checkpoint(path, dtype).to(device)
        resources = {"audio_tokenizer_path": args.audio_tokenizer_path, "local_files_only": args.local_files_only}
    model.set_attention_implementation(args.attn_implementation)
    apply_performance_settings(model, args)
    return model, resources


def add_performance_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("performance (CPU)")
    group.add_argument("--threads", type=_bounded(int, 1), default=None,
                       help="torch intra-op threads (default: torch's choice; 1 is faster on a busy or tiny CPU)")
    group.add_argument("--weight-precision", choices=WEIGHT_PRECISIONS, default="float32",
                       help="int8: opt-in int8 weights for the decoder Linear layers (CPU float32 model only; "
                            "faster, logits within cosine 0.999 of float32)")
    group.add_argument("--compile", action="store_true",
                       help="compile the frame step's local codebook loop with torch.compile (inductor; the first "
                            "start compiles for tens of seconds, later starts read the cache; falls back to eager, "
                            "saying why, where it cannot)")


def apply_performance_settings(model: Any, args: argparse.Namespace) -> None:
    """Apply --threads, --weight-precision and --compile (when the parser has them)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    precision = getattr(args, "weight_precision", "float32")
    if precision != "float32":
        model.set_weight_precision(precision)
    if getattr(args, "compile", False):
        compiled_step.enable(model)


def run_cli(body: Callable[[], int], verbose: bool) -> int:
    """The CLI error boundary: one line per failure, exit 2 for usage, 1 for environment/runtime, 130 on Ctrl-C."""
    root = logging.getLogger()
    level = root.level
    if verbose:
        root.setLevel(logging.DEBUG)  # for this call only: restored below
    try:
        return body()
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except BaseException as exc:  # the CLI boundary: every failure ends with one line (a traceback with --verbose)
        code, message = classify_failure(exc)
        if verbose:
            traceback.print_exc()
    finally:
        root.setLevel(level)
    print(f"error: {message}", file=sys.stderr)
    return code


def classify_failure(exc: BaseException) -> tuple[int, str]:
    """Exit code and one-line message: 2 for invalid input, 1 for environment/runtime failures, 130 on Ctrl-C."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, ValueError):
        return 2, first_line
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, (RuntimeError, OSError, ImportError)):
        return 1, first_line
    return 1, f"internal error {type(exc).__name__}: {first_line} (rerun with --verbose for the traceback)"
