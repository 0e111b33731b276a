"""A thin SentencePiece tokenizer for MOSS-TTS-Nano (loadable as transformers remote code).

The released tokenizer is a 16384-piece SentencePiece BPE model (`tokenizer.model`, nmt_nfkc normalisation, byte
fallback) whose first pieces are the special tokens the prompt layout uses (TTS_SPEC §1). This class only maps text
to those ids and back: it never adds BOS/EOS (the prompt builders in `prompting.py` place every special id
themselves), so `encode(text)` and `encode(text, add_special_tokens=False)` give the same ids.

`build_demo_tokenizer(directory)` trains a small SentencePiece model with the same special pieces in the same order,
so demos and tests run without downloading the released tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

from .atomic_files import write_bytes_atomic

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

# Control pieces (never produced from text by SentencePiece) and their released ids.
CONTROL_PIECES = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}

# User-defined pieces (matched verbatim in text by SentencePiece), in released order from id 4 on.
USER_DEFINED_PIECES = (
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|vision_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|audio_pad|>",
    "<user_inst>",
    "</user_inst>",
)

TOKENIZER_CLASS_NAME = "MossTTSNanoSentencePieceTokenizer"


class MossTTSNanoSentencePieceTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of MOSS-TTS-Nano that adds no special tokens of its own.

    Args:
        vocab_file: path of the SentencePiece model (`tokenizer.model`).
        unk_token, bos_token, eos_token, pad_token: the special tokens (released pieces by default).
        sp_model_kwargs: extra keyword arguments for `sentencepiece.SentencePieceProcessor`.
        **kwargs: passed on to `PreTrainedTokenizer`.

    Raises:
        ValueError: when `vocab_file` is not given or is not a file.
        RuntimeError: when the file is not a readable SentencePiece model.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        sp_model_kwargs: dict[str, Any] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = vocab_file
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        # The model must exist before the base class runs: its __init__ already asks for the vocabulary.
        self.sp_model = _load_sentencepiece(vocab_file, self.sp_model_kwargs)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Why: transformers 4.57 wraps the constructor in `except <protobuf DecodeError>` (an ImportError when
        # protobuf is absent) and `except RuntimeError: return False`, which hides constructor errors. Check the
        # SentencePiece file here, outside that wrapper, so a missing or broken file gets its own clear error.
        location = args[0] if args else "the tokenizer directory"
        _load_sentencepiece(resolved_vocab_files.get("vocab_file"), kwargs.get("sp_model_kwargs") or {}, location)
        return super()._from_pretrained(resolved_vocab_files, *args, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # Why: SentencePiece decodes its control pieces (<s>, </s>, <pad>) to nothing; keep special tokens verbatim
        # and decode only the runs between them.
        special = set(self.all_special_tokens)
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in special:
                parts.append(self.sp_model.decode_pieces(run) + token)
                run = []
            else:
                run.append(token)
        parts.append(self.sp_model.decode_pieces(run))
        return "".join(parts)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # Why: the prompt builders place every special id explicitly; BOS/EOS are never added automatically.
        return list(token_ids_0) + list(token_ids_1 or [])

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Write `tokenizer.model` into `save_directory` (copied, or re-serialised when the source is gone)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        source = self.vocab_file
        if source and os.path.isfile(source):
            if os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        else:
            with open(target, "wb") as handle:
                handle.write(self.sp_model.serialized_model_proto())
        return (target,)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)


def _load_sentencepiece(
    vocab_file: str | None, sp_model_kwargs: dict[str, Any], location: Any = "the tokenizer directory"
) -> spm.SentencePieceProcessor:
    if vocab_file is None or not os.path.isfile(vocab_file):
        raise ValueError(
            f"vocab_file={vocab_file!r} is not a file: MossTTSNanoSentencePieceTokenizer needs the SentencePiece "
            f"model '{VOCAB_FILES_NAMES['vocab_file']}' in {location} (copy it from the released checkpoint, or "
            "create a small one with build_demo_tokenizer(directory))"
        )
    processor = spm.SentencePieceProcessor(**sp_model_kwargs)
    try:
        processor.Load(vocab_file)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"could not read the SentencePiece model {vocab_file!r} ({error}); replace it with a valid tokenizer.model"
        ) from error
    return processor


def tokenizer_metadata() -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the released `tokenizer_config.json` and `special_tokens_map.json` contents.

    Returns:
        (tokenizer_config, special_tokens_map) as JSON-ready dicts.
    """
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {str(index): {"content": piece, **flags, "special": True} for piece, index in CONTROL_PIECES.items()}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "auto_map": {"AutoTokenizer": [f"tokenization_moss_tts_nano.{TOKENIZER_CLASS_NAME}", None]},
        "backend": "custom",
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "extra_special_tokens": {},
        "model_max_length": 16384,
        "pad_token": "<pad>",
        "tokenizer_class": TOKENIZER_CLASS_NAME,
        "unk_token": "<unk>",
    }
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    special_map = {name: {"content": piece, **flags} for name, piece in names.items()}
    return config, special_map


# A small built-in corpus: the prompt template words plus short sentences in a few scripts. The demo model only
# needs to be valid and deterministic; byte fallback covers every character the corpus lacks.
_DEMO_CORPUS = (
    "user",
    "assistant",
    "<user_inst>\n- Reference(s):\n",
    "\n- Instruction:\nNone\n- Tokens:\nNone\n- Quality:\nNone\n- Sound Event:\nNone\n- Ambient Sound:\nNone\n"
    "- Language:\nNone\n- Text:\n",
    "\n</user_inst>",
    "Hello world. This is a small demo of text to speech.",
    "The quick brown fox jumps over the lazy dog, again and again!",
    "How are you today? I am fine, thank you; and you?",
    "Numbers like 1, 2, 3, 10, 42 and 2024 are read aloud: one, two, three.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "Speech synthesis turns written words into natural sounding voice.",
    "今天天气真好，我们一起去公园散步吧。",
    "你好，世界！这是一个语音合成的演示。",
    "我们在这里说话，声音很清楚；明天见。",
    "こんにちは、世界。今日はいい天気ですね。",
    "Bonjour le monde. Comment allez-vous aujourd'hui ?",
    "Hola mundo. ¿Cómo estás? Muy bien, gracias.",
    "Привет, мир! Как дела?",
)


def train_demo_sentencepiece(vocab_size: int = 1024) -> bytes:
    """Train a small deterministic SentencePiece BPE model with the released special pieces and byte fallback.

    Args:
        vocab_size: the upper bound on the number of pieces (the tiny corpus may yield fewer); at least 512.

    Returns:
        The serialised model (the bytes of a `tokenizer.model`).

    Raises:
        ValueError: when `vocab_size` is below 512 or above 16384.
    """
    if not 512 <= vocab_size <= 16384:
        raise ValueError(f"vocab_size={vocab_size} must be within 512..16384 (released vocabulary: 16384)")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_DEMO_CORPUS * 4),
        model_writer=writer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        unk_id=CONTROL_PIECES["<unk>"],
        bos_id=CONTROL_PIECES["<s>"],
        eos_id=CONTROL_PIECES["</s>"],
        pad_id=CONTROL_PIECES["<pad>"],
        user_defined_symbols=list(USER_DEFINED_PIECES),
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return writer.getvalue()


def build_demo_tokenizer(
    directory: str | os.PathLike[str], vocab_size: int = 1024
) -> MossTTSNanoSentencePieceTokenizer:
    """Write a small demo tokenizer (tokenizer.model + the released json metadata) into `directory` and load it.

    The model has the released special pieces at the released ids (<unk>0 <s>1 </s>2 <pad>3 <|im_start|>4 ...
    </user_inst>14), encodes any Unicode text through byte fallback, and is byte-identical on every call.

    Args:
        directory: where to write the files (created when missing).
        vocab_size: upper bound on the number of pieces (see `train_demo_sentencepiece`).

    Returns:
        The loaded tokenizer.

    Raises:
        ValueError: for a `vocab_size` outside 512..16384.
    """
    os.makedirs(directory, exist_ok=True)
    model_path = os.path.join(directory, VOCAB_FILES_NAMES["vocab_file"])
    write_bytes_atomic(model_path, train_demo_sentencepiece(vocab_size))
    config, special_map = tokenizer_metadata()
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        write_bytes_atomic(os.path.join(directory, name), text.encode("utf-8"))
    return MossTTSNanoSentencePieceTokenizer(vocab_file=model_path)
