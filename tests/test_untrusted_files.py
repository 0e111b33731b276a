"""Untrusted checkpoint files: pickles never execute code, safetensors win over .bin, and the CLI says what is wrong."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import infer_npu
from pipeline_assets import tiny_tts
from test_codec_common import tiny_model as tiny_codec

from codec_loading import load_codec
from modeling_moss_tts_nano import MossTTSNanoForCausalLM
from torch_compat import SAFE_TORCH_LOAD_VERSION, torch_version


class _Payload:
    """Unpickling this object would create a directory: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _malicious_bin(path, marker) -> None:
    torch.save({"transformer.wte.weight": _Payload(str(marker))}, str(path))


def test_tts_pickle_weights_never_execute_code(tmp_path):
    directory = tmp_path / "ckpt"
    tiny_tts().save_pretrained(str(directory))
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _malicious_bin(directory / "pytorch_model.bin", marker)
    with pytest.raises(Exception):
        MossTTSNanoForCausalLM.from_pretrained(str(directory))
    assert not marker.exists()


def test_codec_pickle_weights_never_execute_code(tmp_path):
    directory = tmp_path / "codec"
    tiny_codec().save_pretrained(str(directory))
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _malicious_bin(directory / "pytorch_model.bin", marker)
    with pytest.raises(Exception):
        load_codec(directory)
    assert not marker.exists()


def test_safetensors_are_preferred_when_both_exist(tmp_path):
    directory = tmp_path / "ckpt"
    model = tiny_tts()
    model.save_pretrained(str(directory))
    marker = tmp_path / "pwned"
    _malicious_bin(directory / "pytorch_model.bin", marker)  # never even opened
    loaded = MossTTSNanoForCausalLM.from_pretrained(str(directory))
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert not marker.exists()


def test_cli_names_the_malicious_file_and_exits_2(tmp_path, capsys):
    directory = tmp_path / "ckpt"
    tiny_tts().save_pretrained(str(directory))
    (directory / "model.safetensors").unlink()
    (directory / "tokenizer.model").write_bytes(b"")
    marker = tmp_path / "pwned"
    _malicious_bin(directory / "pytorch_model.bin", marker)
    capsys.readouterr()  # drop save_pretrained's progress output
    code = infer_npu.main(["--model-path", str(directory), "--text", "Hi.", "--output-path", str(tmp_path / "o.wav")])
    err = capsys.readouterr().err
    # Before torch 2.6 safe_checkpoint.py refuses the payload's global; from 2.6 torch.load(weights_only=True) does.
    assert code == 2 and "pytorch_model.bin" in err and len(err.strip().splitlines()) == 1
    if torch_version() < SAFE_TORCH_LOAD_VERSION:
        assert "global os.makedirs is not one a state dict needs" in err
    assert not marker.exists() and not (tmp_path / "o.wav").exists()
    shutil.rmtree(directory)
