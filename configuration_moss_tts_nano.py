"""Configuration of MOSS-TTS-Nano (`model_type = "moss_tts_nano"`): fields and validation (TTS_SPEC §2).

Deliberate departure from upstream: the class defaults describe the released 100M model (12 x 768 global decoder,
1 local layer, 16 x 1024 codebooks, special ids 3..9). Upstream's class defaults describe another model (n_vq 8,
Qwen-style ids, 4 local layers); every checkpoint's config.json sets all of these fields anyway.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from transformers import GPT2Config, PretrainedConfig

# Same names as attention.ATTENTION_IMPLEMENTATIONS (kept torch-free here; a test checks they agree).
ATTENTION_NAMES = ("auto", "eager", "sdpa", "flash_attention_2", "npu_fusion_attention")

RELEASED_GPT2_CONFIG: dict[str, Any] = {
    "activation_function": "gelu_new",
    "attn_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
    "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5,
    "n_ctx": 32768,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": 3072,
    "n_layer": 12,
    "n_positions": 32768,
    "position_embedding_type": "rope",
    "rope_base": 10000.0,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 16384,
}

# The released config.json's auto_map; configs built in code get it too so that saved folders load with Auto classes.
AUTO_MAP = {
    "AutoConfig": "configuration_moss_tts_nano.MossTTSNanoConfig",
    "AutoModel": "modeling_moss_tts_nano.MossTTSNanoForCausalLM",
    "AutoModelForCausalLM": "modeling_moss_tts_nano.MossTTSNanoForCausalLM",
}

_SPECIAL_IDS = (
    "pad_token_id",
    "im_start_token_id",
    "im_end_token_id",
    "audio_start_token_id",
    "audio_end_token_id",
    "audio_user_slot_token_id",
    "audio_assistant_slot_token_id",
)
_DERIVED = {"vocab_size": "vocab_size", "hidden_size": "n_embd", "max_position_embeddings": "n_positions"}


class MossTTSNanoConfig(PretrainedConfig):
    """MOSS-TTS-Nano: a GPT-2 style global decoder over frames plus a small local decoder over codebooks.

    Args:
        gpt2_config: the global decoder's GPT-2 settings (dict or `GPT2Config`); missing keys take released values.
        n_vq: number of residual codebooks.
        audio_vocab_size: rows of each audio embedding / head.
        audio_codebook_sizes: valid codes per codebook (default `audio_vocab_size` each).
        audio_pad_token_id: the "no code here" id (outside every codebook).
        local_transformer_layers: blocks of the local decoder.
        attn_implementation / local_transformer_attn_implementation: requested attention of the global / local
            decoder, one of `ATTENTION_NAMES`; resolved per device by the model ("auto" -> sdpa).
        The remaining arguments are the special ids, tokenizer and codec metadata of TTS_SPEC §2.

    Raises:
        ValueError: for inconsistent or unsupported values (the message names the field, value and rule).
    """

    model_type = "moss_tts_nano"
    sub_configs = {"gpt2_config": GPT2Config}

    def __init__(
        self,
        gpt2_config: Optional[Union[dict, GPT2Config]] = None,
        n_vq: int = 16,
        audio_vocab_size: int = 1024,
        audio_codebook_sizes: Optional[list[int]] = None,
        audio_pad_token_id: int = 1024,
        pad_token_id: int = 3,
        im_start_token_id: int = 4,
        im_end_token_id: int = 5,
        audio_start_token_id: int = 6,
        audio_end_token_id: int = 7,
        audio_user_slot_token_id: int = 8,
        audio_assistant_slot_token_id: int = 9,
        attn_implementation: str = "auto",
        local_transformer_attn_implementation: str = "auto",
        local_transformer_layers: int = 1,
        initializer_range: float = 0.02,
        model_architecture: str = "global_local_transformer",
        tokenizer_use_fast: bool = False,
        tokenizer_class: str = "MossTTSNanoSentencePieceTokenizer",
        audio_tokenizer_type: str = "moss-audio-tokenizer-nano",
        audio_tokenizer_pretrained_name_or_path: str = "OpenMOSS-Team/MOSS-Audio-Tokenizer-Nano",
        audio_tokenizer_sample_rate: int = 48000,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.gpt2_config = _build_gpt2_config(gpt2_config)
        self.n_vq = n_vq
        self.audio_vocab_size = audio_vocab_size
        sizes = audio_codebook_sizes if audio_codebook_sizes is not None else [audio_vocab_size] * n_vq
        self.audio_codebook_sizes = [int(size) for size in sizes]
        self.audio_pad_token_id = audio_pad_token_id
        self.im_start_token_id = im_start_token_id
        self.im_end_token_id = im_end_token_id
        self.audio_start_token_id = audio_start_token_id
        self.audio_end_token_id = audio_end_token_id
        self.audio_user_slot_token_id = audio_user_slot_token_id
        self.audio_assistant_slot_token_id = audio_assistant_slot_token_id
        # None (e.g. transformers 4.57 passing from_pretrained's absent argument) means "auto".
        self.attn_implementation = attn_implementation or "auto"
        self.local_transformer_attn_implementation = local_transformer_attn_implementation or "auto"
        self.local_transformer_layers = local_transformer_layers
        self.initializer_range = initializer_range
        self.model_architecture = model_architecture
        self.tokenizer_use_fast = tokenizer_use_fast
        self.audio_tokenizer_type = audio_tokenizer_type
        self.audio_tokenizer_pretrained_name_or_path = audio_tokenizer_pretrained_name_or_path
        self.audio_tokenizer_sample_rate = audio_tokenizer_sample_rate
        derived = {name: getattr(self.gpt2_config, source) for name, source in _DERIVED.items()}
        for name, value in derived.items():
            given = kwargs.pop(name, None)
            if given is not None and given != value:
                raise ValueError(
                    f"{name}={given!r} contradicts gpt2_config.{_DERIVED[name]}={value!r}: it is derived from gpt2_config"
                )
            setattr(self, name, value)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            tokenizer_class=tokenizer_class,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # Set again after the base class: some transformers versions reset these to their own defaults.
        self.pad_token_id = pad_token_id
        self.tokenizer_class = tokenizer_class
        self.tie_word_embeddings = tie_word_embeddings
        self.validate_moss_config()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "MossTTSNanoConfig":
        """Like the base class, but a config.json's `attn_implementation` survives when the caller passes none.

        Why: transformers 4.57 replaces it with the `from_pretrained` argument (None when absent) while 5.x keeps it;
        keeping it makes both versions request the same backends (the model resolves them per device).
        """
        if kwargs.get("attn_implementation") is None and config_dict.get("attn_implementation") is not None:
            kwargs["attn_implementation"] = config_dict["attn_implementation"]
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.gpt2_config.n_embd // self.gpt2_config.n_head

    def validate_moss_config(self) -> None:
        """Check the rules of TTS_SPEC §2 and what this implementation supports.

        Raises:
            ValueError: naming the field, its value and the rule.
        """
        _check_positive_int("n_vq", self.n_vq)
        _check_positive_int("local_transformer_layers", self.local_transformer_layers)
        _check_positive_int("audio_vocab_size", self.audio_vocab_size)
        _check_codebooks(self.n_vq, self.audio_codebook_sizes, self.audio_vocab_size, self.audio_pad_token_id)
        _check_gpt2(self.gpt2_config)
        for name in _SPECIAL_IDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value!r} must be a token id within [0, {self.vocab_size}) (vocab_size)")
        for name in ("attn_implementation", "local_transformer_attn_implementation"):
            if getattr(self, name) not in ATTENTION_NAMES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not a known attention implementation; valid: {ATTENTION_NAMES}"
                )
        if self.model_architecture != "global_local_transformer":
            raise ValueError(
                f"model_architecture={self.model_architecture!r} is not supported; only 'global_local_transformer'"
            )
        if not self.tie_word_embeddings:
            raise ValueError(
                "tie_word_embeddings=False is not supported: the text head is tied to transformer.wte and each audio "
                "head to its audio embedding (TTS_SPEC §3)"
            )


def _build_gpt2_config(gpt2_config: Optional[Union[dict, GPT2Config]]) -> GPT2Config:
    if isinstance(gpt2_config, GPT2Config):
        return gpt2_config
    if gpt2_config is None:
        gpt2_config = {}
    if not isinstance(gpt2_config, dict):
        raise ValueError(f"gpt2_config must be a dict or a GPT2Config, got {type(gpt2_config).__name__}")
    values = {**RELEASED_GPT2_CONFIG, **gpt2_config}
    values.pop("model_type", None)
    return GPT2Config(**values)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_codebooks(n_vq: int, sizes: list[int], audio_vocab_size: int, pad: int) -> None:
    if len(sizes) != n_vq:
        raise ValueError(f"audio_codebook_sizes has {len(sizes)} entries but n_vq={n_vq}: one size per codebook")
    if any(size <= 0 for size in sizes):
        raise ValueError(f"audio_codebook_sizes={sizes} must all be positive")
    if audio_vocab_size < max(sizes):
        raise ValueError(
            f"audio_vocab_size={audio_vocab_size} is smaller than the largest codebook ({max(sizes)}): "
            "it must be >= every audio_codebook_sizes entry"
        )
    if pad < max(sizes):
        raise ValueError(
            f"audio_pad_token_id={pad} lies inside a codebook (largest size {max(sizes)}): it must be >= every size"
        )


def _check_gpt2(config: GPT2Config) -> None:
    for name in ("n_embd", "n_head", "n_layer", "vocab_size", "n_positions"):
        _check_positive_int(f"gpt2_config.{name}", getattr(config, name))
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"gpt2_config.n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
    if (config.n_embd // config.n_head) % 2 != 0:
        raise ValueError(
            f"head size {config.n_embd // config.n_head} (n_embd / n_head) must be even: RoPE rotates pairs"
        )
    position_type = getattr(config, "position_embedding_type", "rope")
    if position_type != "rope":
        raise ValueError(f"gpt2_config.position_embedding_type={position_type!r} is not supported; only 'rope'")
    rope_base = getattr(config, "rope_base", 10000.0)
    if not rope_base > 0:
        raise ValueError(f"gpt2_config.rope_base={rope_base!r} must be > 0")
