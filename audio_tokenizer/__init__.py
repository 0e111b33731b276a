"""MOSS-Audio-Tokenizer-Nano codec as a Hugging Face remote-code folder.

Importing this package is cheap (nothing is imported); the model loads with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` or, on the TTS side, ``codec_loading.load_codec``.
"""
