"""Where the TTS model finds its codec (codec_loading.py); no network is touched."""

from __future__ import annotations

import pytest

from codec_loading import has_weights, resolve_codec_directory


def _codec_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_explicit_directory_wins(tmp_path):
    explicit = _codec_dir(tmp_path / "codec")
    model_dir = tmp_path / "model"
    _codec_dir(model_dir / "audio_tokenizer")
    assert resolve_codec_directory(explicit, model_dir, "org/name") == explicit


def test_explicit_directory_without_weights_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no codec weights"):
        resolve_codec_directory(tmp_path / "empty", None, None)


def test_checkpoint_subfolder_is_used_before_the_config_value(tmp_path):
    model_dir = tmp_path / "model"
    sub = _codec_dir(model_dir / "audio_tokenizer")
    assert resolve_codec_directory(None, model_dir, "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano") == sub


def test_config_relative_path_inside_model_dir(tmp_path):
    model_dir = tmp_path / "model"
    inner = _codec_dir(model_dir / "codec")
    assert resolve_codec_directory(None, model_dir, "codec") == inner


@pytest.mark.parametrize("configured", ["../outside", "/etc", "./../x"])
def test_config_paths_never_leave_the_model_directory(tmp_path, configured):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _codec_dir(tmp_path / "outside")
    with pytest.raises(ValueError, match="outside the model directory|leaves the model directory"):
        resolve_codec_directory(None, model_dir, configured)


def test_hub_id_offline_gives_a_clear_remedy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RuntimeError, match="--audio-tokenizer-path"):
        resolve_codec_directory(None, None, "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano")


def test_nothing_configured(tmp_path):
    with pytest.raises(ValueError, match="no audio codec"):
        resolve_codec_directory(None, tmp_path, None)
    with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
        resolve_codec_directory("not a hub id!", None, None)


def test_has_weights_accepts_every_official_file_name(tmp_path):
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"):
        folder = tmp_path / name
        folder.mkdir()
        assert not has_weights(folder)
        (folder / name).write_text("")
        assert has_weights(folder)
