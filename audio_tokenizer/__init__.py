"""MOSS-Audio-Tokenizer-Nano codec as a Hugging Face remote-code folder.

Importing this package is cheap (standard library only); the model modules load on first use:
``from audio_tokenizer.modeling_moss_audio_tokenizer import MossAudioTokenizerModel`` or
``audio_tokenizer.load_codec_from_directory(path, device, dtype)``.
"""

from .loading import import_codec_package, load_codec_from_directory

__all__ = ["import_codec_package", "load_codec_from_directory"]
