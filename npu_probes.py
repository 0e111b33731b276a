"""Ascend kernel probes that need more than an op's presence and the card's SoC (docs/npu_api_notes.md).

- ``npu_rotary_mul``'s interleave mode exists only in torch_npu's aclnn implementation. torch_npu takes its older
  aclop implementation when JIT compilation is on (``torch.npu.is_jit_compile_false()`` is False) or when the
  installed CANN lacks ``aclnnRotaryPositionEmbedding``, and that one raises "npu_rotary_mul in aclop only support
  rotary_mode with half, but got ..." for every call. ``rotary_interleave_problem`` therefore requires JIT
  compilation off and runs one tiny interleave call, compared against the real-valued kernel, before the model
  plans the fused kernel; any error or mismatch plans the real-valued kernel instead, with the reason.
- ``npu_fusion_attention``'s documented shape limits depend on the torch_npu release (``fusion_attention_limits``,
  read once per process): the docs of 2.1.0.post8, 2.3.1 to 2.3.1.post4 and 2.4.0 to 2.4.0.post2 require every
  sequence length to be a multiple of 16 (so one-row decode steps never qualify) and head_dim in {64, 80, 96, 120,
  128, 256}; later docs allow S up to 1M, head_dim up to 768 and up to 256 heads. The attention backend asks
  ``fusion_attention_fits`` (integer comparisons, decided per shape class before the call, never by catching a
  kernel error) and runs SDPA for shapes outside them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import re
import sys
from typing import Any, Callable, Optional, Union

import torch

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# npu_rotary_mul's interleave mode


def jit_compile_problem(npu: Any) -> Optional[str]:
    """Why torch_npu would take the aclop ``npu_rotary_mul`` (JIT compilation on), or None when it is off.

    ``torch.npu.is_jit_compile_false()`` is in ``torch_npu/npu/npu_config.py`` of every release read (2.1.0.post8 to
    2.14.0); a torch.npu without it cannot tell, which counts as a problem.
    """
    probe = getattr(npu, "is_jit_compile_false", None)
    if probe is None:
        return "torch.npu.is_jit_compile_false is missing, so the aclnn path of npu_rotary_mul cannot be confirmed"
    if not bool(probe()):
        return ("JIT compilation is on (torch.npu.is_jit_compile_false() is False): torch_npu then runs the aclop "
                "npu_rotary_mul, which supports rotary_mode='half' only; call "
                "torch.npu.set_compile_mode(jit_compile=False) before loading the model to use the fused kernel")
    return None


def rotary_interleave_problem(npu: Any, tiny_call: Callable[[], float], tolerance: float) -> Optional[str]:
    """Why the fused interleave RoPE must not be planned, or None when it may.

    Args:
        npu: ``torch.npu``.
        tiny_call: runs one small interleave rotation and returns its largest absolute difference from the
            real-valued kernel on the same input (rotary.py builds it with the model's head count, head_dim and dtype).
        tolerance: the largest difference accepted for the dtype.
    """
    problem = jit_compile_problem(npu)
    if problem is not None:
        return problem
    try:
        difference = float(tiny_call())
    # Why broad: this is the probe itself. The aclop fallback raises RuntimeError, a CANN without the aclnn op or a
    # driver fault raises whatever torch_npu wraps it in; any failure here means "do not plan the fused kernel".
    except Exception as exc:  # noqa: BLE001
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return f"a probe call of npu_rotary_mul(rotary_mode='interleave') failed ({type(exc).__name__}: {first_line})"
    if not difference <= tolerance:  # also catches NaN
        return (f"a probe call of npu_rotary_mul(rotary_mode='interleave') differs from the real-valued kernel by "
                f"{difference:.3g} (> {tolerance:.3g})")
    return None


def probe_tensor_device(device: Union[torch.device, str]) -> torch.device:
    """Where the probe's tensors live: the model's device (tests/npu_simulation.py points it at the CPU)."""
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------------------
# npu_fusion_attention's documented shapes


@dataclasses.dataclass(frozen=True)
class FusionAttentionLimits:
    """The shapes one torch_npu release documents for ``npu_fusion_attention`` (``_op_plugin_docs.py``)."""

    docs: str  # which documentation the limits come from
    max_sequence: int  # every S (queries and keys) within 1..max_sequence
    sequence_multiple: int  # every S a multiple of this
    head_dims: Optional[frozenset[int]]  # allowed head_dim values, or None for 1..max_head_dim
    max_head_dim: int
    max_heads: Optional[int]
    max_batch: Optional[int]

    def shape_class(self, batch: int, heads: int, num_queries: int, num_keys: int, head_dim: int) -> tuple[bool, ...]:
        """Which documented limits a BNSD call of this shape meets: (query length, key length, head_dim, heads,
        batch), each True or False. Integer comparisons only: the attention backend asks before every call."""
        return (1 <= num_queries <= self.max_sequence and num_queries % self.sequence_multiple == 0,
                1 <= num_keys <= self.max_sequence and num_keys % self.sequence_multiple == 0,
                1 <= head_dim <= self.max_head_dim and (self.head_dims is None or head_dim in self.head_dims),
                self.max_heads is None or heads <= self.max_heads,
                self.max_batch is None or batch <= self.max_batch)

    def problem(self, batch: int, heads: int, num_queries: int, num_keys: int, head_dim: int) -> Optional[str]:
        """Which documented limit a BNSD call of this shape breaks (a message), or None when it is within all."""
        for name, length in (("query", num_queries), ("key", num_keys)):
            if not 1 <= length <= self.max_sequence:
                return f"{name} length {length} is outside 1..{self.max_sequence}"
            if length % self.sequence_multiple:
                return f"{name} length {length} is not a multiple of {self.sequence_multiple}"
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"head_dim {head_dim} is not one of {sorted(self.head_dims)}"
        if not 1 <= head_dim <= self.max_head_dim:
            return f"head_dim {head_dim} is outside 1..{self.max_head_dim}"
        if self.max_heads is not None and heads > self.max_heads:
            return f"{heads} heads exceed {self.max_heads}"
        if self.max_batch is not None and batch > self.max_batch:
            return f"batch {batch} exceeds {self.max_batch}"
        return None


_SEQUENCE_16_DOCS = FusionAttentionLimits(
    docs="torch_npu 2.1.0.post8 / 2.3.1-2.3.1.post4 / 2.4.0-2.4.0.post2 docs", max_sequence=32 * 1024,
    sequence_multiple=16, head_dims=frozenset({64, 80, 96, 120, 128, 256}), max_head_dim=256, max_heads=None,
    max_batch=None)
_LATER_DOCS = FusionAttentionLimits(
    docs="torch_npu 2.1.0.post12 / 2.3.1.post6 / 2.4.0.post4 / 2.5.1 and later docs", max_sequence=1024 * 1024,
    sequence_multiple=1, head_dims=None, max_head_dim=768, max_heads=256, max_batch=2 * 1024 * 1024)
# First post release of each line whose docs drop the multiple-of-16 rule (read: 2.1.0.post12, 2.3.1.post6,
# 2.4.0.post4); lines from 2.5 on all have the later docs. Unread releases in between keep the stricter limits.
_FIRST_LATER_DOCS = {(2, 1, 0): 12, (2, 3, 1): 6, (2, 4, 0): 4}
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:\.post(\d+))?")


def limits_for_release(version: Optional[str]) -> FusionAttentionLimits:
    """The documented limits of torch_npu ``version`` (e.g. "2.3.1.post2"); unknown or unparsable: the strict ones."""
    match = _VERSION.match(version or "")
    if match is None:
        return _SEQUENCE_16_DOCS
    release, post = tuple(int(part) for part in match.groups()[:3]), int(match.group(4) or 0)
    if release >= (2, 5, 0):
        return _LATER_DOCS
    first = _FIRST_LATER_DOCS.get(release)
    return _LATER_DOCS if first is not None and post >= first else _SEQUENCE_16_DOCS


def torch_npu_version() -> Optional[str]:
    """The installed torch_npu release (the imported module's ``__version__``, else the distribution's), or None."""
    module = sys.modules.get("torch_npu")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version("torch_npu")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def fusion_attention_limits() -> FusionAttentionLimits:
    """The documented ``npu_fusion_attention`` limits of the installed torch_npu (read once per process)."""
    return limits_for_release(torch_npu_version())


_SHAPE_CLASSES_LOGGED: set[tuple[bool, ...]] = set()


def fusion_attention_fits(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether a (B, N, S, D) query/key pair is within the installed release's documented shapes.

    Decided from the shape class (`FusionAttentionLimits.shape_class`) before the call; each class outside the
    limits is logged once, with the first shape that fell in it.
    """
    batch, heads, num_queries, head_dim = query.shape
    limits = fusion_attention_limits()
    shape_class = limits.shape_class(batch, heads, num_queries, key.shape[2], head_dim)
    if all(shape_class):
        return True
    if shape_class not in _SHAPE_CLASSES_LOGGED:
        _SHAPE_CLASSES_LOGGED.add(shape_class)
        logger.info("npu_fusion_attention: %s (%s); calls of this kind run sdpa",
                    limits.problem(batch, heads, num_queries, key.shape[2], head_dim), limits.docs)
    return False


def clear_caches() -> None:
    """Forget the cached torch_npu release limits and the logged shape classes (tests)."""
    fusion_attention_limits.cache_clear()
    _SHAPE_CLASSES_LOGGED.clear()
