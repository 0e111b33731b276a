"""safe_checkpoint.py, the reader of pytorch_model.bin before torch 2.6, tested like a security boundary: the released
format round-trips exactly, crafted pickles are refused without executing anything, sizes are checked before any
work, and mutated checkpoints raise only the reader's own error (hypothesis)."""

from __future__ import annotations

import collections
import importlib
import io
import os
import pathlib
import pickle
import pickletools
import shutil
import struct
import tempfile
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import safe_checkpoint
import torch_compat
from conftest import ROOT, needs_safe_torch_load, shared_path
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from safe_checkpoint import UnsafeCheckpointError, load_state_dict


# ------------------------------------------------------------------------------------------------ a pickle assembler


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:  # LONG1: any size and sign
    data = value.to_bytes((value.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _call(function: bytes, *arguments: bytes) -> bytes:
    return function + b"(" + b"".join(arguments) + b"tR"


def _tensor(storage_key: str, numel: int, size: tuple, stride: tuple, offset: int = 0,
            storage_type: str = "FloatStorage") -> bytes:
    pid = b"(" + _text("storage") + _global("torch", storage_type) + _text(storage_key) + _text("cpu") + _int(numel)
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), pid + b"tQ", _int(offset),
                 b"(" + b"".join(map(_int, size)) + b"t", b"(" + b"".join(map(_int, stride)) + b"t", b"\x89",
                 _global("collections", "OrderedDict") + b")R")


def _state(**entries: bytes) -> bytes:
    """A protocol-2 pickle of {name: value} with each value's opcodes given."""
    return b"\x80\x02}(" + b"".join(_text(k) + v for k, v in entries.items()) + b"u."


def _zip(path: pathlib.Path, data_pkl: bytes, storages: dict | None = None,
         compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


FLOATS = torch.arange(6, dtype=torch.float32)


def _valid(path: pathlib.Path) -> pathlib.Path:
    return _zip(path, _state(w=_tensor("0", 6, (2, 3), (3, 1)), b=_tensor("0", 6, (2,), (1,), offset=4)),
                {"0": FLOATS.numpy().tobytes()})


def _refused(path: pathlib.Path, match: str) -> None:
    with pytest.raises(UnsafeCheckpointError, match=match):
        load_state_dict(path)


# ------------------------------------------------------------------------------------------------ round trips


def test_the_assembler_builds_what_the_reader_reads(tmp_path):
    state = load_state_dict(_valid(tmp_path / "valid.bin"))
    assert list(state) == ["w", "b"]
    assert torch.equal(state["w"], FLOATS.view(2, 3)) and torch.equal(state["b"], FLOATS[4:])
    assert state["b"].untyped_storage().data_ptr() == state["w"].untyped_storage().data_ptr()  # shared, as saved


def _every_kind_of_tensor() -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3)
    state = linear.state_dict()  # an OrderedDict with _metadata
    state.update(tied=state["weight"], view=state["weight"][:, 1:], transposed=state["weight"].t(),
                 half=torch.randn(4).half(), bf16=torch.randn(2, 2).bfloat16(), double=torch.randn(3).double(),
                 long=torch.arange(7), int8=torch.arange(-3, 3, dtype=torch.int8), flags=torch.tensor([True, False]),
                 empty=torch.zeros(0, 4), scalar=torch.tensor(2.5), uint8=torch.arange(5, dtype=torch.uint8))
    return state


@pytest.mark.parametrize("map_location", ["cpu", "meta"])
def test_every_tensor_kind_round_trips_with_shared_storage_and_metadata(tmp_path, map_location):
    state = _every_kind_of_tensor()
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = load_state_dict(tmp_path / "pytorch_model.bin", map_location=map_location)
    assert list(loaded) == list(state) and loaded._metadata == state._metadata
    for name, tensor in state.items():
        got = loaded[name]
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == \
            (tensor.dtype, tensor.shape, tensor.stride(), tensor.storage_offset()), name
        assert got.device.type == map_location and (map_location == "meta" or torch.equal(got, tensor)), name
    assert loaded["tied"] is loaded["weight"]
    if map_location == "cpu":
        assert loaded["view"].untyped_storage().data_ptr() == loaded["weight"].untyped_storage().data_ptr()


@needs_safe_torch_load
def test_the_golden_checkpoints_read_exactly_as_torch_load_reads_them(tmp_path):
    for name in ("tts_tiny", "codec_tiny"):
        source = load_file(shared_path("golden", name, "model.safetensors"))
        torch.save(source, tmp_path / f"{name}.bin")
        expected = torch_compat.load_pickled_weights(tmp_path / f"{name}.bin")  # torch.load(weights_only=True)
        loaded = load_state_dict(tmp_path / f"{name}.bin")
        assert list(loaded) == list(expected)
        for key, tensor in expected.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def _bin_checkpoint(root: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """The golden tiny TTS checkpoint as the release ships it (pytorch_model.bin), with this repository's code."""
    golden = shared_path("golden", "tts_tiny")
    root.mkdir()
    for source in ROOT.glob("*.py"):
        shutil.copy(source, root / source.name)
    shutil.copy(golden / "config.json", root / "config.json")
    weights = load_file(golden / "model.safetensors")
    torch.save(weights, root / "pytorch_model.bin")
    return root, weights


def test_the_bin_golden_loads_through_the_auto_class_with_remote_code(tmp_path):
    """On torch < 2.6 (the torch 2.3.1 CI stack) this goes through safe_checkpoint.py, from 2.6 through torch.load."""
    root, weights = _bin_checkpoint(tmp_path / "MOSS-TTS-Nano")
    model = AutoModelForCausalLM.from_pretrained(str(root), trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules") and model.name_or_path == str(root)
    state = model.state_dict()
    for key, tensor in weights.items():
        assert torch.equal(state[key], tensor), key
    assert model.text_lm_head.weight is model.transformer.wte.weight


def test_the_bin_golden_never_reaches_torch_load_before_torch_2_6(tmp_path, monkeypatch):
    root, weights = _bin_checkpoint(tmp_path / "MOSS-TTS-Nano")
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 5))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    model, info = MossTTSNanoForCausalLM.from_pretrained(str(root), dtype=torch.float16, output_loading_info=True)
    assert not info["missing_keys"] and model.transformer.wte.weight.dtype == torch.float16
    assert torch.equal(model.transformer.wte.weight, weights["transformer.wte.weight"].half())


def test_the_codec_loader_reads_a_bin_codec_without_torch_load_before_torch_2_6(tmp_path, monkeypatch):
    import codec_loading
    from test_codec_common import random_codes, tiny_model as tiny_codec

    codec = tiny_codec(seed=5)
    codec.config.save_pretrained(tmp_path)
    torch.save(codec.state_dict(), tmp_path / "pytorch_model.bin")
    module = codec_loading.codec_code_module()  # the codec package the loader imports
    compat = importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".torch_compat")
    monkeypatch.setattr(compat, "torch_version", lambda: (2, 5))
    monkeypatch.setattr(torch, "load", _refuse_torch_load)
    loaded = codec_loading.load_codec(tmp_path)
    codes = random_codes(3, seed=6)
    assert torch.equal(loaded.batch_decode([codes]).audio, codec.batch_decode([codes]).audio)


def _refuse_torch_load(*args, **kwargs):
    raise AssertionError("torch.load was called")


@pytest.mark.parametrize(("hub_files", "expected"), [
    ({"pytorch_model.bin"}, "pytorch_model.bin"),
    ({"pytorch_model.bin", "model.safetensors"}, None),
    ({"pytorch_model.bin", "model.safetensors.index.json"}, None),
    (set(), None),
])
def test_hub_ids_are_routed_like_folders_before_torch_2_6(monkeypatch, hub_files, expected):
    import transformers.utils

    asked = []

    def cached_file(repo, name, **kwargs):
        asked.append((repo, name, kwargs.get("revision")))
        return f"/cache/{name}" if name in hub_files else None

    monkeypatch.setattr(transformers.utils, "cached_file", cached_file)
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 5))
    found = torch_compat.pickled_only_weights("OpenMOSS-Team/MOSS-TTS-Nano", revision="main", trust_remote_code=True)
    assert found == (None if expected is None else f"/cache/{expected}")
    assert asked and all(call[:1] == ("OpenMOSS-Team/MOSS-TTS-Nano",) and call[2] == "main" for call in asked)
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 6))
    assert torch_compat.pickled_only_weights("OpenMOSS-Team/MOSS-TTS-Nano") is None  # torch.load is safe there


def test_the_codec_carries_an_identical_copy():
    assert (ROOT / "audio_tokenizer" / "safe_checkpoint.py").read_bytes() == (ROOT / "safe_checkpoint.py").read_bytes()


# ------------------------------------------------------------------------------------------------ crafted pickles


def _live(payload: bytes, marker: pathlib.Path) -> bool:
    """Whether Python's own unpickler runs the payload (creates the marker): proof the test payload is real."""
    try:
        pickle.loads(payload)
    except Exception:  # noqa: BLE001  (a payload may fail after its side effect)
        pass
    created = marker.exists()
    if created:
        marker.rmdir() if marker.is_dir() else marker.unlink()
    return created


def _payloads(marker: pathlib.Path) -> dict[str, bytes]:
    quoted = repr(str(marker))
    return {
        "os.system": _call(_global("os", "system"), _text(f"mkdir {marker}")),
        "eval": _call(_global("builtins", "eval"), _text(f"__import__('os').makedirs({quoted})")),
        "getattr": _call(_call(_global("builtins", "getattr"), _call(_global("builtins", "__import__"), _text("os")),
                               _text("makedirs")), _text(str(marker))),
        "builtins.exec": _call(_global("builtins", "exec"), _text(f"import os; os.makedirs({quoted})")),
        "__builtin__ (protocol-2 alias)": _call(_global("__builtin__", "eval"),
                                                _text(f"__import__('os').makedirs({quoted})")),
        "nested in containers": b"}(" + _text("inner") + b"(" + _text("deeper") + _call(
            _global("builtins", "eval"), _text(f"__import__('os').makedirs({quoted})")) + b"tu",
        "a pickle inside the pickle": _call(_global("pickle", "loads"), _call(
            _global("_codecs", "encode"), _text(pickle.dumps(_MakeDirs(str(marker)), protocol=0).decode("latin-1")),
            _text("latin-1"))),
    }


class _MakeDirs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


@pytest.mark.parametrize("kind", ["os.system", "eval", "getattr", "builtins.exec", "__builtin__ (protocol-2 alias)",
                                  "nested in containers", "a pickle inside the pickle"])
def test_code_execution_payloads_are_refused_unexecuted(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    data = _state(evil=payload, w=_tensor("0", 6, (6,), (1,)))  # first: pickle.loads stops at the tensor's storage
    assert _live(data, marker), "the payload must run under pickle.loads, or the test proves nothing"
    path = _zip(tmp_path / "evil.bin", data, {"0": FLOATS.numpy().tobytes()})
    _refused(path, r"is refused: global .* is not one a state dict needs")
    assert not marker.exists()


@pytest.mark.parametrize(("opcodes", "match"), [
    (_call(_global("torch", "FloatStorage"), _int(10**12)), r"a call of torch\.FloatStorage"),  # 4 TB if it ran
    (_call(_global("collections", "OrderedDict"), b"]" + _text("x") + b"a"), r"pickle opcode EMPTY_LIST"),
    (_call(_global("collections", "OrderedDict"), b"}"), r"a call of collections\.OrderedDict"),
    (_call(_global("torch._utils", "_rebuild_tensor_v2"), _int(1)), r"_rebuild_tensor_v2 with 1 arguments"),
    (_call(_text("not callable")), r"a call of str"),
    (_global("torch._utils", "_rebuild_parameter"), r"global torch\._utils\._rebuild_parameter"),
    (_global("torch", "load"), r"global torch\.load"),
    (_call(_global("collections", "OrderedDict"), b")" + b"\x85" * 100_000), r"a call of collections\.OrderedDict"),
    (_tensor("0", 6, (6,), (1,)) + b"}" + _text("requires_grad") + b"\x88sb", r"BUILD other than"),  # setstate
])
def test_reduce_and_build_are_limited_to_the_state_dict_calls(tmp_path, opcodes, match):
    _refused(_zip(tmp_path / "evil.bin", _state(w=opcodes), {"0": FLOATS.numpy().tobytes()}), match)


def test_protocol_0_and_other_protocols_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    protocol_0 = pickle.dumps({"w": _MakeDirs(str(marker))}, protocol=0)
    assert _live(protocol_0, marker)
    _refused(_zip(tmp_path / "p0.bin", protocol_0), "not a protocol-2 pickle")
    forged = b"\x80\x02" + protocol_0  # a protocol-2 header on protocol-0 opcodes
    _refused(_zip(tmp_path / "forged.bin", forged), r"global (posix|os)\.makedirs|opcode")
    protocol_4 = pickle.dumps({"w": _MakeDirs(str(marker))}, protocol=4)
    _refused(_zip(tmp_path / "p4.bin", protocol_4), "not a protocol-2 pickle")
    _refused(_zip(tmp_path / "p4forged.bin", b"\x80\x02" + protocol_4[2:]), r"opcode|protocol 4")
    assert not marker.exists()


def test_legacy_and_foreign_files_are_refused(tmp_path):
    torch.save({"w": FLOATS}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    _refused(tmp_path / "legacy.bin", "not a readable zip-format state dict")
    with zipfile.ZipFile(tmp_path / "foreign.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")
    _refused(tmp_path / "foreign.zip", r"no single <archive>/data\.pkl")
    (tmp_path / "empty.bin").write_bytes(b"")
    _refused(tmp_path / "empty.bin", "not a readable zip-format state dict")


# ------------------------------------------------------------------------------------------------ storages and sizes


def _patched_header_offset(path: pathlib.Path, record: str, offset: int) -> None:
    """Point `record`'s central-directory entry at `offset` (a record that lies outside the file)."""
    data = bytearray(path.read_bytes())
    entry = data.index(b"PK\x01\x02")  # the first central-directory entry
    while True:
        name_length = struct.unpack_from("<H", data, entry + 28)[0]
        if data[entry + 46 : entry + 46 + name_length].decode() == record:
            struct.pack_into("<I", data, entry + 42, offset)
            break
        entry = data.index(b"PK\x01\x02", entry + 4)
    path.write_bytes(bytes(data))


def test_storage_records_must_be_inside_the_zip_by_name(tmp_path):
    storage = {"0": FLOATS.numpy().tobytes()}
    _refused(_zip(tmp_path / "a.bin", _state(w=_tensor("../../etc/passwd", 6, (6,), (1,))), storage), "malformed")
    _refused(_zip(tmp_path / "b.bin", _state(w=_tensor("7", 6, (6,), (1,))), storage), r"'archive/data/7' is not in")
    path = _zip(tmp_path / "c.bin", _state(w=_tensor("0", 6, (6,), (1,))), storage)
    _patched_header_offset(path, "archive/data/0", 2**31)
    _refused(path, "points outside the file")
    _refused(_zip(tmp_path / "d.bin", _state(w=_tensor("0", 6, (6,), (1,))), storage, zipfile.ZIP_DEFLATED),
             "compressed")


@pytest.mark.parametrize(("tensor", "match"), [
    (_tensor("0", 2**64 + 6, (6,), (1,)), "holds 24 bytes, its storage needs"),  # numel * 4 overflows 64 bits
    (_tensor("0", 7, (7,), (1,)), "holds 24 bytes, its storage needs 28"),
    (_tensor("0", 6, (2**40, 2**40), (1, 1)), "outside its storage"),
    (_tensor("0", 6, (2**62, 2**62), (2**62, 1)), "outside its storage"),
    (_tensor("0", 6, (10**15,), (0,)), "outside its storage"),  # a broadcast view larger than its storage
    (_tensor("0", 6, (3,), (1,), offset=2**63), "outside its storage"),
    (_tensor("0", 6, (3,), (1,), offset=4), "outside its storage"),
    (_tensor("0", 6, (-1,), (1,)), "tensor arguments"),
    (_tensor("0", 6, (1,), (-1,)), "tensor arguments"),
    (_tensor("0", 6, (1,) * 65, (1,) * 65), "tensor arguments"),
    (_tensor("0", -1, (1,), (1,)), "malformed"),
    (_tensor("0", 6, (6,), (1,), storage_type="ComplexFloatStorage"), r"global torch\.ComplexFloatStorage"),
])
def test_sizes_are_checked_against_the_zip_records_before_any_read(tmp_path, monkeypatch, tensor, match):
    monkeypatch.setattr(safe_checkpoint._Reader, "_read_storage", _never)
    _refused(_zip(tmp_path / "sizes.bin", _state(w=tensor), {"0": FLOATS.numpy().tobytes()}), match)


def test_a_storage_used_with_two_dtypes_is_refused(tmp_path):
    data = _state(a=_tensor("0", 6, (6,), (1,)), b=_tensor("0", 12, (12,), (1,), storage_type="HalfStorage"))
    _refused(_zip(tmp_path / "twice.bin", data, {"0": FLOATS.numpy().tobytes()}), "two dtypes or sizes")


def test_an_oversized_pickle_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    path = _valid(tmp_path / "valid.bin")
    monkeypatch.setattr(safe_checkpoint, "MAX_PICKLE_BYTES", 64)
    monkeypatch.setattr(pickletools, "genops", _never)
    _refused(path, r"data\.pkl' is \d+ bytes \(more than 64\)")


def _never(*args, **kwargs):
    raise AssertionError("work was done before the sizes were checked")


@pytest.mark.parametrize(("data", "match"), [
    (b"\x80\x02}q\x00h\x05.", "read before it is written"),
    (b"\x80\x02t.", "needs a MARK"),
    (b"\x80\x02\x86.", "more values than the stack holds"),
    (b"\x80\x02}}.", "malformed stack"),
    (b"\x80\x02K\x01.", "not a dict of tensors"),
    (b"\x80\x02}(K\x01K\x02u.", "is not a string"),
    (b"\x80\x02}", "no STOP|not a readable"),
])
def test_malformed_pickles_are_refused(tmp_path, data, match):
    _refused(_zip(tmp_path / "bad.bin", data), match)


# ------------------------------------------------------------------------------------------------ fuzzing


def _reference_checkpoint() -> tuple[bytes, bytes]:
    """(a torch.save file, its data.pkl) of a small state dict with shared storages and _metadata."""
    buffer = io.BytesIO()
    torch.save(_every_kind_of_tensor(), buffer)
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pkl = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return data, pkl


REFERENCE_FILE, REFERENCE_PICKLE = _reference_checkpoint()


def _mutate(data: bytes, draw) -> bytes:
    mutated = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip" and mutated:
            mutated[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and mutated:
            mutated[position] = draw(st.integers(0, 255))
        elif kind == "insert":
            mutated[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del mutated[position : position + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del mutated[position:]
    return bytes(mutated)


def _load_or_refuse(path: str) -> None:
    try:
        state = load_state_dict(path)
    except UnsafeCheckpointError:
        return
    assert isinstance(state, collections.OrderedDict) and all(isinstance(v, torch.Tensor) for v in state.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), where=st.sampled_from(["data.pkl", "whole file"]))
def test_mutated_checkpoints_raise_only_the_readers_error(data, where):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pytorch_model.bin")
        if where == "whole file":
            with open(path, "wb") as handle:
                handle.write(_mutate(REFERENCE_FILE, data.draw))
        else:  # a valid zip around a mutated pickle: the mutations reach the opcode checks
            with zipfile.ZipFile(io.BytesIO(REFERENCE_FILE)) as source, zipfile.ZipFile(path, "w") as target:
                for info in source.infolist():
                    body = source.read(info)
                    target.writestr(info.filename, _mutate(body, data.draw) if info.filename.endswith("data.pkl")
                                    else body)
        _load_or_refuse(path)
