"""Linear layers and the CPU kernels behind them: `linear` (split matrix-vector products and oneDNN rows on the CPU
fast paths, `F.linear` elsewhere), the row-invariant products batched requests need, and `PrecisionLinear` with its
int8 weights (fbgemm). With MOSS_TTS_CPU_FAST_PATHS=0 the CPU runs what accelerators run."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import platform
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_fast_paths import cpu_fast_paths_enabled, cpu_kernel
from .torch_compat import is_compiling

logger = logging.getLogger(__name__)

WEIGHT_PRECISIONS = ("float32", "int8")


class PrecisionLinear(nn.Linear):
    """nn.Linear that can run from a derived reduced-precision copy of its weight (opt-in, CPU, never saved).

    The parameters stay as they are (same names, dtype, ties, state_dict); "int8" adds a packed copy of the weight
    (per-output-channel symmetric int8, ~1/4 of the float32 bytes) used by `forward` through fbgemm's dynamic
    quantized linear: activations are quantized per row with the row's own range (per-token dynamic quantization,
    7-bit range as fbgemm needs on AVX2 without VNNI), products accumulate in int32 and the output is float32. "float32" drops the copy. Change the weights
    (load_state_dict, in-place edits) only in float32, or set the precision again afterwards.
    """

    # (the packed int8 weight without bias, the sums of its dequantized rows for `_int8_rows`), None in float32. One
    # attribute, built whole by set_weight_precision / _apply and only read by forward: threads running forwards
    # at once never see half of it, and forward derives nothing.
    _packed_rows: Any = None

    @property
    def _packed(self) -> Any:
        """The packed int8 weight (without bias: forward adds it), None in float32."""
        return None if self._packed_rows is None else self._packed_rows[0]

    @property
    def weight_precision(self) -> str:
        return "float32" if self._packed_rows is None else "int8"

    def set_weight_precision(self, precision: str) -> None:
        """Switch between the float32 weight ("float32") and a packed int8 copy ("int8").

        Raises:
            ValueError: for an unknown precision.
            RuntimeError: for "int8" when the weight is not a float32 CPU tensor, no int8 engine is available, or
                MOSS_TTS_CPU_FAST_PATHS=0.
        """
        if precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a known weight precision; valid: {WEIGHT_PRECISIONS}")
        self._packed_rows = None if precision == "float32" else _pack_int8_rows(self.weight)
        _own_int8(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_compiling():  # the graph operator finds this layer's int8 copy, if any, at run time (`_graph_product`)
            return linear(x, self.weight, self.bias)
        return self._product(x, self._packed_rows)  # read once

    def _product(self, x: torch.Tensor, int8: Any) -> torch.Tensor:
        if int8 is not None:
            # Per-row (per-token) dynamic quantization in every mode: a row's int8 result never depends on the rows
            # beside it (fbgemm alone would quantize a product of several rows with one range).
            if x.numel() == x.shape[-1] and _BATCHED_PRODUCTS.get() != "row-invariant":
                # Why: for a lone row fbgemm's one range is that row's own, and its kernel is 2-5x faster than the
                # pinned-row form (2-core Zen 4, 768-3072 wide). Batch-invariant steps take that form for every
                # row, so a row's bits never depend on how many rows run.
                out = torch.ops.quantized.linear_dynamic(x.reshape(1, -1), int8[0], True)  # reduce_range
                return (out if self.bias is None else out + self.bias).view(*x.shape[:-1], out.shape[-1])
            return self._int8_rows(x, *int8)
        return _eager_linear(x, self.weight, self.bias)  # never inside a graph: forward and the operator call this

    def _int8_rows(self, x: torch.Tensor, packed: Any, weight_sums: torch.Tensor) -> torch.Tensor:
        """int8 products whose rows do not depend on each other (per-row dynamic activation quantization).

        Why: fbgemm quantizes the activations of a product with one range for all its rows, so a row's result would
        depend on its neighbours. Here each row is mapped onto [0, 1] by its own range first, and two pinned rows (0
        and 1) fix the product's range, so every row is quantized exactly as alone, with its own 7-bit range like
        the one-row product; W x = span * (W x') + low * (W 1) restores it (W as quantized).
        """
        flat = x.reshape(-1, x.shape[-1])
        low = flat.amin(dim=1, keepdim=True)
        span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(torch.finfo(torch.float32).tiny)
        pins = torch.stack((flat.new_zeros(flat.shape[1]), flat.new_ones(flat.shape[1])))
        out = torch.ops.quantized.linear_dynamic(torch.cat(((flat - low) / span, pins)), packed, True)
        out = out[: flat.shape[0]] * span + low * weight_sums
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "PrecisionLinear":
        forget_packed(self.weight)  # a moved or cast weight gets a new packed copy when a CPU product next needs it
        result = super()._apply(fn, *args, **kwargs)
        if self._packed_rows is not None:
            # Why: the packed copy derives from a float32 CPU weight; rebuild it, or drop it when that no longer holds.
            if self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
                self._packed_rows = _pack_int8_rows(self.weight)
            else:
                logger.warning("moving or casting a model in int8 weight precision switches it back to float32")
                self._packed_rows = None
            _own_int8(self)
        return result


# Layers in int8 by their weight's (data pointer, shape): how the graph operator, which sees only tensors, finds the
# packed int8 copy of a weight. An entry holds weak references only and checks the weight is still the layer's.
_INT8_OWNERS: dict[tuple, tuple] = {}


def _own_int8(layer: PrecisionLinear) -> None:
    key = (layer.weight.data_ptr(), tuple(layer.weight.shape))
    if layer._packed_rows is None:
        if key in _INT8_OWNERS and _INT8_OWNERS[key][1]() is layer:
            _INT8_OWNERS.pop(key, None)
        return
    _INT8_OWNERS[key] = (weakref.ref(layer.weight), weakref.ref(layer))
    weakref.finalize(layer.weight, _INT8_OWNERS.pop, key, None)


def _int8_owner(weight: torch.Tensor) -> Optional[PrecisionLinear]:
    entry = _INT8_OWNERS.get((weight.data_ptr(), tuple(weight.shape)))
    layer = None if entry is None else entry[1]()
    if layer is None or entry[0]() is None or layer.weight.data_ptr() != weight.data_ptr():
        return None
    return layer


# A decoding step multiplies a handful of rows by every weight: memory-bound matrix-vector products. On CPU,
# F.linear sends them to a single-threaded GEMV and to a poor small-GEMM path for 2-16 rows; the same product as a
# batched matmul over SPLIT_PARTS equal blocks of output rows runs the blocks on all threads, so a decoding step
# uses the whole memory bandwidth (figures: benchmarks/measured/ and docs/performance.md). Same float32 math per output, only
# the summation order inside a dot product can differ (relative ~1e-7). More rows (a prompt) are GEMMs: see `linear`.
SPLIT_MAX_ROWS = 16
SPLIT_PARTS = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with float32 CPU fast paths. Where `packed_onednn_usable()` (x86-64 builds with oneDNN), products
    of PACKED_MIN_ROWS or more rows (a batched step, a prompt) with a weight of at least PACK_MIN_OUT_FEATURES
    outputs run oneDNN on a prepacked copy of the weight (`packed_onednn_weight`), and so do products of one or two
    rows inside `batched_products(row_invariant=True)` (one kernel for every row count: a row's bits do not depend
    on it); other products of one or two rows take `split_matvec_linear`, which reads weights that are not in cache
    faster. Without packed oneDNN: `split_matvec_linear` for up to SPLIT_MAX_ROWS rows (a generation
    step) and oneDNN for more (a prompt: oneDNN's GEMM gets closer to the CPU's peak than F.linear's). Same math;
    the summation order inside a dot product can differ (relative ~1e-7). Inside `batched_products()`, products of
    two or more rows (and with row_invariant, of one row too) go through oneDNN (see there). Plain F.linear with
    MOSS_TTS_CPU_FAST_PATHS=0 (what accelerators run)."""
    if is_compiling():  # inside a graph: this function at run time, as one operator (if registered)
        if _GRAPH_LINEAR is not None and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32:
            return _GRAPH_LINEAR(x, weight, bias)
        return F.linear(x, weight, bias)
    return _eager_linear(x, weight, bias)


def _eager_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`linear` outside a graph: its kernel choice (also what the graph operator runs)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or not weight.is_contiguous() or not cpu_fast_paths_enabled()):
        return F.linear(x, weight, bias)
    if weight.shape[0] >= PACK_MIN_OUT_FEATURES and not _needs_autograd(x, weight) and packed_onednn_usable():
        if (x.numel() >= PACKED_MIN_ROWS * x.shape[-1] or _BATCHED_PRODUCTS.get() == "row-invariant"
                or weight.shape[0] % SPLIT_PARTS):
            return _packed_product(x, packed_onednn_weight(weight), bias)
        return split_matvec_linear(x, weight, bias)
    batched = _BATCHED_PRODUCTS.get()
    if batched and (batched == "row-invariant" or x.numel() > x.shape[-1]) and not _needs_autograd(x, weight) \
            and row_invariant_limit():
        return _onednn_rows(x, weight, bias)
    if x.numel() <= SPLIT_MAX_ROWS * x.shape[-1]:
        if weight.shape[0] % SPLIT_PARTS == 0:
            return split_matvec_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    if _needs_autograd(x, weight) or not onednn_linear_usable():
        return F.linear(x, weight, bias)  # Why: the oneDNN op has no backward
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


# Inside a compiled graph (compiled_step.py) the CPU products run as one opaque operator that makes `linear`'s
# choice at run time. Why: inductor lowers a one-row F.linear to addmm, a single-threaded GEMV (817 us against 496 us
# for the split matvec per local-decoder product, 2-core Zen 4), and traced the split-matvec form slower still.
_GRAPH_LINEAR: Optional[Callable] = None
_GRAPH_LIBRARY: Any = None
_GRAPH_LOCK = threading.Lock()


def register_graph_linear() -> None:
    """Make `linear`'s eager choice the operator moss_tts_nano::linear that compiled graphs call (once per process)."""
    global _GRAPH_LINEAR, _GRAPH_LIBRARY
    with _GRAPH_LOCK:
        if _GRAPH_LINEAR is not None:
            return
        if not hasattr(torch.ops.moss_tts_nano, "linear"):  # another copy of this module may have registered it
            library = torch.library.Library("moss_tts_nano", "FRAGMENT")
            library.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
            library.impl("linear", _graph_product, "CPU")
            register_fake = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract  # torch 2.3
            register_fake("moss_tts_nano::linear", lib=library)(_linear_shape)
            _GRAPH_LIBRARY = library
        _GRAPH_LINEAR = torch.ops.moss_tts_nano.linear.default


def _graph_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The graph operator at run time: the int8 product of the layer that owns `weight` when that layer is in int8
    precision (the same kernel and bits as its eager forward), else `linear`'s eager choice."""
    layer = _int8_owner(weight)
    int8 = None if layer is None else layer._packed_rows
    if int8 is not None:
        return layer._product(x, int8)
    return _eager_linear(x, weight, bias)


def graph_products_registered() -> bool:
    """Whether compiled graphs call this module's product operator, which int8 layers need to stay int8 inside a
    graph (an operator another copy of this module registered knows only that copy's int8 layers)."""
    return _GRAPH_LIBRARY is not None


def _linear_shape(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _needs_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


@functools.lru_cache(maxsize=None)
def onednn_linear_usable() -> bool:
    """Whether oneDNN's float32 linear (`torch.ops.mkldnn._linear_pointwise`, which inductor uses) runs here.

    x86-64 only (where it was measured faster than F.linear), and only if it gives F.linear's result on a probe.
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        x, weight = torch.arange(40.0).view(5, 8) / 7, torch.arange(24.0).view(3, 8) / 5
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, weight), rtol=1e-6, atol=1e-6))
    except (AttributeError, RuntimeError, TypeError):  # op missing or not built for this CPU
        return False


_BATCHED_PRODUCTS: contextvars.ContextVar[str] = contextvars.ContextVar("moss_tts_batched_products", default="")


@contextlib.contextmanager
def batched_products(row_invariant: bool = True) -> Iterator[int]:
    """Products for batched decoding, where a few rows share each product (this thread only; the engine's steps).

    Float32 CPU products of several rows go through oneDNN (on packed weights where `packed_onednn_usable()`: three
    or more rows; else two or more): its GEMM reads the weights once for all rows and gives a row the same bits
    for every row count within a range (one kernel; `row_invariant_limit()` probes it once), while the split
    matvec and MKL's GEMM change a row's summation order with the row count. With `row_invariant`, every row count
    takes that oneDNN product (one row too: the packed product directly, the plain one padded to two), so a row's
    result never depends on how many rows share the product or where it sits: a request batched with others
    computes exactly what it computes alone. That costs one or two rows: the split matvec streams weights that
    are not in cache faster. Without it, they take the split matvec and only their last bits can differ from the
    same rows beside others. int8 weights: with `row_invariant`, each row's
    activations are quantized with the row's own range (`PrecisionLinear._int8_rows`; integer sums, so exact).
    Other devices and dtypes run as usual: cuBLAS and the Ascend kernels pick kernels by shape, so there a row's
    low bits may depend on the batch.

    Yields:
        `row_invariant_limit()`: products of 2 up to that many rows keep a row's bits here (0: none).
    """
    token = _BATCHED_PRODUCTS.set("row-invariant" if row_invariant else "batched")
    try:
        yield row_invariant_limit()
    finally:
        _BATCHED_PRODUCTS.reset(token)


ROW_PROBE_MAX = 64


def row_invariant_limit() -> int:
    """The largest row count R such that oneDNN's float32 linear gives a row the same bits for every row count in
    2..R and every position (probed once up to ROW_PROBE_MAX rows on a released-size weight); 0 where oneDNN is
    unusable (see `onednn_linear_usable`), two rows already differ from three, or MOSS_TTS_CPU_FAST_PATHS=0 (plain
    F.linear, as on an accelerator).

    Why a limit: oneDNN switches kernels at a row count that depends on its version and the CPU (16 rows in
    torch 2.3.1's build on AVX-512; none up to 300 rows in torch 2.13's).
    """
    if not cpu_fast_paths_enabled():
        return 0
    unpacked = _onednn_row_limit()  # the small products (fewer than PACK_MIN_OUT_FEATURES outputs) run unpacked
    return min(unpacked, _packed_row_limit()) if packed_onednn_usable() else unpacked


@functools.lru_cache(maxsize=None)
def _onednn_row_limit() -> int:
    if not onednn_linear_usable():
        return 0
    limit = _probe_row_limit(_onednn_rows, smallest=2)
    if limit == 0:
        logger.warning("oneDNN's float32 products depend on the row count on this CPU: batched requests may "
                       "differ from solo runs in their last bits")
    return limit


def _probe_row_limit(product: Callable, smallest: int, prepare: Callable = lambda weight: weight) -> int:
    """The largest R such that `product(rows, prepare(weight), bias)` gives a row the same bits for every row count
    from `smallest` to R, wherever the row sits (three positions; probed up to ROW_PROBE_MAX rows on a released-size
    weight); 0 when `smallest` rows already differ from one more."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(768, 768, generator=generator)
    bias = torch.randn(768, generator=generator)
    rows = torch.randn(ROW_PROBE_MAX + 1, 768, generator=generator)
    weight = prepare(weight)
    reference = product(rows[:smallest], weight, bias)[0]
    for count in range(smallest + 1, ROW_PROBE_MAX + 1):
        if not all(torch.equal(product(_placed(rows, count, position), weight, bias)[position], reference)
                   for position in (0, count // 2, count - 1)):
            return count - 1 if count > smallest + 1 else 0
    return ROW_PROBE_MAX


def _placed(rows: torch.Tensor, count: int, position: int) -> torch.Tensor:
    probe = rows[1 : count + 1].clone()
    probe[position] = rows[0]
    return probe


def _onednn_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 1:
        flat = flat.expand(2, -1)  # why: oneDNN takes a one-row product down another path (a GEMV)
    out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, bias, "none", [], "")
    return out[:rows].view(*x.shape[:-1], weight.shape[0])


# oneDNN on a prepacked weight. oneDNN's float32 GEMM wants the weight in a blocked layout of its own; given a plain
# weight, `_linear_pointwise` reorders it at every call, which for a few rows costs more than the product. Packed
# once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU backend does), a 4-row product of a
# 3072 x 768 weight read from memory took 524 us against 894 us for the plain weight and 800 us for the split matvec;
# for one row the split matvec stays faster (416 vs 747 us) (one thread, 2-core Zen 4, torch 2.13:
# benchmarks/linear_products.py, benchmarks/measured/epyc_zen4_2core_linear_kernels_threads1.json). The packed copy is derived data, like the int8
# copy: it costs the weight's bytes again, lives in a process-wide table keyed by the weight tensor (never in the
# module, so state_dict, deepcopy and pickling never see it), and is rebuilt when the weight changes (its version
# counter or storage moves: load_state_dict, in-place edits, .to()).
PACKED_MIN_ROWS = 3  # fewer rows: the split matvec (weights streamed from memory: 400 vs 730 us for one row of a
# 3072 x 768 weight, 760 vs 610 us for three; one thread, 2-core Zen 4, torch 2.13)
PACK_MIN_OUT_FEATURES = 64  # smaller products (the 2-row candidate head, rebuilt per request) stay unpacked
_PACKED: dict[int, tuple] = {}  # id(weight) -> (weakref to weight, version, data_ptr, packed copy)
_PACK_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def packed_onednn_usable() -> bool:
    """Whether `linear` runs oneDNN on prepacked weights here: x86-64, the op present, F.linear's result on a probe,
    and a row's bits the same for one, two and three rows at least (`_packed_row_limit`, which also bounds
    `row_invariant_limit`)."""
    if not onednn_linear_usable() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        x, weight = torch.arange(40.0).view(5, 8) / 7, torch.arange(24.0).view(3, 8) / 5
        out = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight), None, "none",
                                                 [], "")
        close = bool(torch.allclose(out, F.linear(x, weight), rtol=1e-6, atol=1e-6))
    except (AttributeError, RuntimeError, TypeError):
        return False
    return close and _packed_row_limit() >= 3


def _weight_key(weight: torch.Tensor) -> tuple[int, int]:
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter; it cannot change outside inference mode
        version = -1
    return version, weight.data_ptr()


def packed_onednn_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of a float32 CPU weight (out, in), made once per weight and version (thread-safe)."""
    key = id(weight)
    state = _weight_key(weight)
    entry = _PACKED.get(key)
    if entry is not None and entry[0]() is weight and entry[1:3] == state:
        return entry[3]
    with _PACK_LOCK:
        entry = _PACKED.get(key)
        if entry is not None and entry[0]() is weight and entry[1:3] == state:
            return entry[3]
        packed = _reorder(weight.detach())
        if entry is None or entry[0]() is not weight:
            weakref.finalize(weight, _PACKED.pop, key, None)
        _PACKED[key] = (weakref.ref(weight), *state, packed)
        return packed


def _reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def forget_packed(weight: torch.Tensor) -> None:
    """Drop the packed copy of `weight` (its memory) now, e.g. when the weight leaves the CPU."""
    with _PACK_LOCK:
        entry = _PACKED.get(id(weight))
        if entry is not None and entry[0]() is weight:
            del _PACKED[id(weight)]


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat if flat.is_contiguous() else flat.contiguous(), packed, bias,
                                             "none", [], "")
    return out.view(*x.shape[:-1], packed.shape[0])


@functools.lru_cache(maxsize=None)
def _packed_row_limit() -> int:
    """The largest R such that the packed product gives a row the same bits for every row count 1..R and every
    position (`_probe_row_limit`); 0 when one row differs from two."""
    return _probe_row_limit(_packed_product, smallest=1, prepare=_reorder)


def split_matvec_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for a few rows of x, as one batched matmul over SPLIT_PARTS blocks of weight rows."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    blocks = weight.view(SPLIT_PARTS, out_features // SPLIT_PARTS, in_features)
    columns = x.reshape(1, rows, in_features).transpose(1, 2).expand(SPLIT_PARTS, in_features, rows)
    if bias is None:
        out = torch.bmm(blocks, columns)
    else:
        out = torch.baddbmm(bias.view(SPLIT_PARTS, out_features // SPLIT_PARTS, 1), blocks, columns)
    out = out.view(out_features, rows)
    out = out.view(1, out_features) if rows == 1 else out.t().contiguous()
    return out.view(*x.shape[:-1], out_features)


def resolve_linear_kernel(device: Union[torch.device, str], dtype: torch.dtype) -> str:
    """What `linear` runs for a model on (device, dtype): for float32 on CPU with the fast paths on, "split-matvec/onednn-packed"
    (or "split-matvec/onednn" without packed oneDNN weights, "split-matvec" without oneDNN), else "F.linear"."""
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if device_type != "cpu" or dtype != torch.float32:
        return "F.linear"
    kernel = cpu_kernel("linear")
    if kernel != "split-matvec/onednn-packed" or packed_onednn_usable():
        return kernel
    return "split-matvec/onednn" if onednn_linear_usable() else "split-matvec"


def _pack_int8(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Any:
    if cpu_kernel("int8_weights") is None:
        raise RuntimeError(
            "int8 weight precision is a CPU fast path and MOSS_TTS_CPU_FAST_PATHS=0 turns the CPU fast paths off "
            "(the CPU then runs what an accelerator runs); unset MOSS_TTS_CPU_FAST_PATHS or set it to 1 for int8"
        )
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise RuntimeError(
            f"int8 weight precision needs a float32 CPU model (weight is {weight.dtype} on {weight.device}); "
            "call model.to('cpu', torch.float32) first, or keep float32"
        )
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm"} & set(engines):
        raise RuntimeError(f"int8 weight precision needs torch's x86/fbgemm quantized engine; this build has {engines}")
    if torch.backends.quantized.engine not in ("x86", "fbgemm"):
        # Why here only: prepacking reads the process-wide engine, but a packed weight keeps its own kernel (a later
        # engine change does not affect `linear_dynamic` on it). So the switch happens when int8 is set up (or the
        # model is moved), never during generation, where it would race with other threads.
        torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    with torch.no_grad(), warnings.catch_warnings():
        # Why: torch flags its quantized-tensor constructors as deprecated; they are still the only CPU int8 path
        # here that beats float32 (torchao's eager int8 CPU kernels measured slower than float32 on AVX2).
        warnings.simplefilter("ignore", UserWarning)
        w = weight.detach()
        scales = (w.abs().amax(dim=1).double() / 127.0).clamp_min(1e-12)  # (out,)
        zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach())


def _pack_int8_rows(weight: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The packed int8 copy without bias and the sums of its dequantized rows (W 1), for `_int8_rows`."""
    packed = _pack_int8(weight, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qweight, _ = torch.ops.quantized.linear_unpack(packed)
        return packed, qweight.dequantize().sum(dim=1)


