"""Read a zip-format ``pytorch_model.bin`` state dict without ``torch.load``: the reader for torch < 2.6.

Before torch 2.6, ``torch.load(weights_only=True)`` can run code from a crafted file (CVE-2025-32434), and the
torch_npu 2.1-2.5 stacks pin such a torch. This module never unpickles with Python's ``pickle``: it walks the
``data.pkl`` opcodes itself (``pickletools.genops`` only parses them) and gives meaning to the few a plain state
dict written by ``torch.save`` uses (protocol 2):

- globals: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the storage types
  (``torch.FloatStorage``, ...) as markers, never imported or called; any other global is refused;
- ``REDUCE`` on ``OrderedDict()`` and on ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
  OrderedDict()[, {}])`` only; ``BUILD`` only to attach ``_metadata`` (module versions) to the state dict;
- persistent ids ``("storage", <storage type>, "<digits>", <location>, numel)``, each taken from the record
  ``<archive>/data/<digits>`` of the same zip, by name.

Every size is checked before any work: the ``data.pkl`` record is at most ``MAX_PICKLE_BYTES``, records must be
stored uncompressed and lie inside the file, a storage's record holds exactly ``numel * itemsize`` bytes, and a
tensor's extent (offset + strides) lies within its storage and it has no more elements than the storage. The whole
pickle is checked on meta tensors before a single storage byte is read (then each storage once, by its record's
size, with its CRC checked). Anything else raises ``UnsafeCheckpointError`` naming the file and what was refused, without executing anything from the file.

This file is self-contained (the standard library and torch): the codec package carries an identical copy
(``audio_tokenizer/safe_checkpoint.py``, checked by tests/test_safe_checkpoint.py).
"""

from __future__ import annotations

import collections
import os
import pickletools
import re
import reprlib
import sys
import zipfile
from typing import Any, Optional, Union

import torch

MAX_PICKLE_BYTES = 64 * 2**20  # a state dict's data.pkl is ~100 bytes per tensor; 64 MiB is ~500k tensors
MAX_DIMS = 64
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_STORAGE_KEY = re.compile(r"[0-9]{1,20}")
_OPCODES = frozenset({  # what torch.save's protocol-2 pickle of a state dict contains, nothing more
    "PROTO", "STOP", "MARK", "GLOBAL", "REDUCE", "BUILD", "BINPERSID", "EMPTY_DICT", "EMPTY_TUPLE", "TUPLE",
    "TUPLE1", "TUPLE2", "TUPLE3", "SETITEM", "SETITEMS", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "BININT",
    "BININT1", "BININT2", "LONG1", "BINUNICODE", "NEWTRUE", "NEWFALSE", "NONE",
})


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint this reader refuses: not a plain zip-format state dict, or inconsistent sizes."""


class _Global:
    """A permitted global, as a marker: the reader acts on its name and never imports or calls it."""

    def __init__(self, name: str, dtype: Optional[torch.dtype] = None) -> None:
        self.name, self.dtype = name, dtype


_ORDERED_DICT = _Global("collections.OrderedDict")
_REBUILD_TENSOR = _Global("torch._utils._rebuild_tensor_v2")
_GLOBALS = {("collections", "OrderedDict"): _ORDERED_DICT, ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
            **{("torch", name): _Global(f"torch.{name}", dtype) for name, dtype in _STORAGE_DTYPES.items()}}


class _Storage:
    """A storage of the zip, checked against its record: while the pickle is walked, a flat meta tensor of its dtype
    and size (nothing is read until every check has passed)."""

    def __init__(self, flat: torch.Tensor, info: zipfile.ZipInfo) -> None:
        self.flat, self.info = flat, info


def load_state_dict(path: Union[str, os.PathLike], map_location: Union[str, torch.device, None] = "cpu"
                    ) -> "collections.OrderedDict[str, torch.Tensor]":
    """Read the state dict of a zip-format ``torch.save`` file (``pytorch_model.bin``) without unpickling it.

    Args:
        path: the file.
        map_location: "cpu" (tensors with their data) or "meta" (shapes and dtypes only, nothing read but the
            pickle); every storage lands there, whatever device it was saved from.

    Returns:
        The state dict (name -> tensor); tied tensors share storage, as with ``torch.load``.

    Raises:
        UnsafeCheckpointError: anything other than a plain state dict (see the module docstring).
        ValueError: an unsupported ``map_location``.
        OSError: the file cannot be opened.
    """
    device = torch.device("cpu" if map_location is None else map_location)
    if device.type not in ("cpu", "meta"):
        raise ValueError(f"map_location={map_location!r} is not supported; use 'cpu' or 'meta'")
    if sys.byteorder != "little":
        raise UnsafeCheckpointError(f"'{path}': this reader runs on little-endian hosts only")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        try:
            return _Reader(path, handle, size, device).read()
        except UnsafeCheckpointError:
            raise
        # Why broad-ish: zipfile, pickletools and the checks below signal malformed input with these types; each
        # means "not a checkpoint this reader accepts" and becomes the loader's one error type.
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
                IndexError, OverflowError, NotImplementedError, RuntimeError) as exc:
            raise UnsafeCheckpointError(f"'{path}' is not a readable zip-format state dict "
                                        f"({type(exc).__name__}: {exc})") from None


class _Reader:
    def __init__(self, path: Union[str, os.PathLike], handle: Any, size: int, device: torch.device) -> None:
        self.path, self.size, self.device = path, size, device
        self.archive = zipfile.ZipFile(handle)
        self.records = self._records()
        self.storages: dict[str, _Storage] = {}
        self.tensors: dict[int, _Storage] = {}  # id of each rebuilt (meta) tensor -> its storage

    def refuse(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"'{self.path}' is refused: {what} (only plain zip-format state dicts are read "
                                     "safely before torch 2.6; convert_to_safetensors.py on torch >= 2.6 also works)")

    def _records(self) -> dict[str, zipfile.ZipInfo]:
        infos = self.archive.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise self.refuse("the zip holds two records of one name")
        pickles = [name for name in names if re.fullmatch(r"[^/]+/data\.pkl", name)]
        if len(pickles) != 1:
            raise self.refuse("no single <archive>/data.pkl record (a legacy or non-torch file)")
        self.prefix = pickles[0][: -len("data.pkl")]
        return {info.filename: info for info in infos}

    def _record_bytes(self, name: str, expected: Optional[int] = None, limit: Optional[int] = None) -> bytes:
        info = self.records.get(name)
        if info is None:
            raise self.refuse(f"record {name!r} is not in the zip")
        self._check_record(info, expected, limit)
        return self.archive.read(info)

    def _check_record(self, info: zipfile.ZipInfo, expected: Optional[int], limit: Optional[int]) -> None:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise self.refuse(f"record {info.filename!r} is compressed (torch.save stores records as they are)")
        if info.header_offset < 0 or info.header_offset + 30 + len(info.orig_filename) + info.file_size > self.size:
            raise self.refuse(f"record {info.filename!r} points outside the file")
        if expected is not None and info.file_size != expected:
            raise self.refuse(f"record {info.filename!r} holds {info.file_size} bytes, its storage needs {expected}")
        if limit is not None and info.file_size > limit:
            raise self.refuse(f"record {info.filename!r} is {info.file_size} bytes (more than {limit})")

    def read(self) -> "collections.OrderedDict[str, torch.Tensor]":
        if self.prefix + "byteorder" in self.records:  # torch >= 2.1 writes it
            if self._record_bytes(self.prefix + "byteorder", limit=16) != b"little":
                raise self.refuse("the storages are not little-endian")
        data = self._record_bytes(self.prefix + "data.pkl", limit=MAX_PICKLE_BYTES)
        if data[:2] != b"\x80\x02":
            raise self.refuse("data.pkl is not a protocol-2 pickle (torch.save's format)")
        result = _check_result(self, _Machine(self).run(data))
        return result if self.device.type == "meta" else self._materialize(result)

    def _materialize(self, result: "collections.OrderedDict[str, torch.Tensor]"
                     ) -> "collections.OrderedDict[str, torch.Tensor]":
        """The state dict with its meta tensors replaced by views of the storages read from the zip (once each)."""
        flats: dict[int, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        for name, meta in result.items():
            if id(meta) not in done:
                storage = self.tensors[id(meta)]
                if id(storage) not in flats:
                    nbytes = storage.info.file_size
                    flats[id(storage)] = self._read_storage(storage.info, nbytes).view(storage.flat.dtype)
                tensor = flats[id(storage)].as_strided(meta.shape, meta.stride(), meta.storage_offset())
                done[id(meta)] = tensor.requires_grad_(True) if meta.requires_grad else tensor
            result[name] = done[id(meta)]
        return result

    def storage(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.refuse(f"persistent id {_short(pid)} is not a storage reference")
        _, kind, key, location, numel = pid
        if not (isinstance(kind, _Global) and kind.dtype is not None):
            raise self.refuse(f"persistent id {_short(pid)} names no storage type")
        if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key) and isinstance(location, str)
                and len(location) <= 64 and _is_int(numel) and numel >= 0):
            raise self.refuse(f"persistent id {_short(pid)} is malformed")
        cached = self.storages.get(key)
        if cached is not None:
            if cached.flat.dtype != kind.dtype or cached.flat.numel() != numel:
                raise self.refuse(f"storage {key} is referenced with two dtypes or sizes")
            return cached
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        name = f"{self.prefix}data/{key}"
        info = self.records.get(name)
        if info is None:
            raise self.refuse(f"storage record {name!r} is not in the zip")
        self._check_record(info, numel * itemsize, None)
        self.storages[key] = _Storage(torch.empty(numel, dtype=kind.dtype, device="meta"), info)
        return self.storages[key]

    def _read_storage(self, info: zipfile.ZipInfo, nbytes: int) -> torch.Tensor:
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view, filled = memoryview(raw.numpy()), 0
        with self.archive.open(info) as stream:  # checks the CRC once the record is read to its end
            while filled < nbytes:
                count = stream.readinto(view[filled : filled + (1 << 24)])
                if not count:
                    raise self.refuse(f"record {info.filename!r} ends early")
                filled += count
            if stream.read(1):
                raise self.refuse(f"record {info.filename!r} is longer than its storage")
        return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """A bounded repr for messages (reprlib stops at a few levels, so a deeply nested payload cannot recurse)."""
    text = reprlib.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class _Mark:
    """The MARK opcode's place on the stack."""


class _Machine:
    """The subset of the pickle virtual machine a state dict needs, with every operand checked."""

    def __init__(self, reader: _Reader) -> None:
        self.reader = reader
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}

    def run(self, data: bytes) -> Any:
        for opcode, argument, position in pickletools.genops(data):
            name = opcode.name
            if name not in _OPCODES:
                raise self.reader.refuse(f"pickle opcode {name} at byte {position}")
            if name == "STOP":
                if len(self.stack) != 1:
                    raise self.reader.refuse("data.pkl ends with a malformed stack")
                return self.stack[0]
            self.step(name, argument)
        raise self.reader.refuse("data.pkl has no STOP")

    def pop_mark(self) -> list[Any]:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _Mark:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        raise self.reader.refuse("a pickle opcode needs a MARK that is not there")

    def pop(self, count: int = 1) -> list[Any]:
        if count > len(self.stack) or any(item is _Mark for item in self.stack[len(self.stack) - count :]):
            raise self.reader.refuse("a pickle opcode needs more values than the stack holds")
        items = self.stack[len(self.stack) - count :]
        del self.stack[len(self.stack) - count :]
        return items

    def step(self, name: str, argument: Any) -> None:
        if name == "PROTO":
            if argument != 2:
                raise self.reader.refuse(f"pickle protocol {argument}")
        elif name == "MARK":
            self.stack.append(_Mark)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "BINUNICODE"):
            self.stack.append(argument)
        elif name in ("NEWTRUE", "NEWFALSE", "NONE"):
            self.stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[name])
        elif name == "EMPTY_DICT":
            self.stack.append({})
        elif name == "EMPTY_TUPLE":
            self.stack.append(())
        elif name == "TUPLE":
            self.stack.append(tuple(self.pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            self.stack.append(tuple(self.pop(int(name[-1]))))
        elif name in ("BINPUT", "LONG_BINPUT"):
            self.memo[argument] = self.pop()[0]
            self.stack.append(self.memo[argument])
        elif name in ("BINGET", "LONG_BINGET"):
            if argument not in self.memo:
                raise self.reader.refuse(f"pickle memo entry {argument} is read before it is written")
            self.stack.append(self.memo[argument])
        elif name == "GLOBAL":
            self.stack.append(self.find_global(argument))
        elif name == "BINPERSID":
            self.stack.append(self.reader.storage(self.pop()[0]))
        elif name in ("SETITEM", "SETITEMS"):
            self.set_items(self.pop(2) if name == "SETITEM" else self.pop_mark())
        elif name == "REDUCE":
            function, arguments = self.pop(2)
            self.stack.append(self.reduce(function, arguments))
        elif name == "BUILD":
            target, state = self.pop(2)
            self.build(target, state)
            self.stack.append(target)

    def find_global(self, argument: Any) -> _Global:
        module, _, qualified = str(argument).partition(" ")
        found = _GLOBALS.get((module, qualified))
        if found is None:
            raise self.reader.refuse(f"global {module}.{qualified} is not one a state dict needs")
        return found

    def set_items(self, items: list[Any]) -> None:
        if len(items) % 2 or not self.stack or not isinstance(self.stack[-1], dict):
            raise self.reader.refuse("SETITEM(S) without a dict and key/value pairs")
        target = self.stack[-1]
        for key, value in zip(items[::2], items[1::2]):
            if not isinstance(key, str):
                raise self.reader.refuse(f"dict key {_short(key)} is not a string")
            target[key] = value

    def reduce(self, function: Any, arguments: Any) -> Any:
        if not isinstance(arguments, tuple):
            raise self.reader.refuse("REDUCE without an argument tuple")
        if function is _ORDERED_DICT and arguments == ():
            return collections.OrderedDict()
        if function is _REBUILD_TENSOR:
            return _rebuild_tensor(self.reader, arguments)
        what = function.name if isinstance(function, _Global) else type(function).__name__
        raise self.reader.refuse(f"a call of {what}{_short(arguments)}")

    def build(self, target: Any, state: Any) -> None:
        if not (isinstance(target, collections.OrderedDict) and isinstance(state, dict)
                and set(state) == {"_metadata"} and _is_metadata(state["_metadata"])):
            raise self.reader.refuse("BUILD other than a state dict's _metadata")
        target._metadata = state["_metadata"]


def _is_metadata(value: Any) -> bool:
    """Module versions as ``state_dict()`` records them: {prefix: {"version": int, ...}} with plain values."""
    plain = (str, int, bool, type(None))
    return isinstance(value, dict) and all(
        isinstance(prefix, str) and isinstance(entry, dict)
        and all(isinstance(key, str) and isinstance(item, plain) for key, item in entry.items())
        for prefix, entry in value.items())


def _rebuild_tensor(reader: _Reader, arguments: tuple) -> torch.Tensor:
    """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``, checked, as a view."""
    if len(arguments) not in (6, 7):
        raise reader.refuse(f"_rebuild_tensor_v2 with {len(arguments)} arguments")
    storage, offset, size, stride, requires_grad, hooks = arguments[:6]
    if not isinstance(storage, _Storage):
        raise reader.refuse("a tensor without a storage from the zip")
    shape_ok = (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_DIMS
                and all(_is_int(n) and n >= 0 for n in (*size, *stride)) and _is_int(offset) and offset >= 0)
    if not shape_ok or not isinstance(requires_grad, bool):
        raise reader.refuse(f"tensor arguments {_short(arguments[1:5])}")
    metadata = arguments[6] if len(arguments) == 7 else None
    if not (isinstance(hooks, collections.OrderedDict) and not hooks) or not (
            metadata is None or (isinstance(metadata, dict) and not metadata)):
        raise reader.refuse("a tensor with backward hooks or metadata")
    available, count = storage.flat.numel(), 1
    for n in size:
        count *= n
    if count and (offset + sum((n - 1) * s for n, s in zip(size, stride)) >= available or count > available):
        raise reader.refuse(f"tensor of size {size}, stride {stride}, offset {offset} outside its storage of "
                            f"{available} elements")
    tensor = storage.flat.as_strided(size, stride, offset if count else 0)
    if requires_grad:
        if not tensor.is_floating_point():
            raise reader.refuse("requires_grad on a non-floating tensor")
        tensor.requires_grad_(True)
    reader.tensors[id(tensor)] = storage
    return tensor


def _check_result(reader: _Reader, result: Any) -> "collections.OrderedDict[str, torch.Tensor]":
    if not isinstance(result, dict) or not all(isinstance(v, torch.Tensor) for v in result.values()):
        raise reader.refuse("the pickle is not a dict of tensors")
    if isinstance(result, collections.OrderedDict):
        return result
    return collections.OrderedDict(result)
