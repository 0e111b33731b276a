"""Configuration of the MOSS-Audio-Tokenizer-Nano codec (the "Cat" codec).

The class defaults describe the released Nano layout (48 kHz stereo, 12.5 frames per second, 16 x 1024 codes).
Upstream's class defaults describe a larger, different model; the released ``config.json`` always sets every field,
so only code that builds a config from scratch sees the difference.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")
QUANTIZER_TYPES = ("rlfq", "random_prefix_rlfq")
MODULE_TYPES = ("PatchedPretransform", "Transformer")

_COMPUTE_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
_QUANTIZER_DEFAULTS = {
    "input_dim": 768, "rvq_dim": 512, "output_dim": 768, "num_quantizers": 16, "codebook_size": 1024,
    "codebook_dim": 8,
}
# Training-only quantizer fields: kept in the config (the released file has them), unused at inference.
_QUANTIZER_TRAINING_DEFAULTS = {"codebook_loss_weight": 1.0, "commitment_loss_weight": 0.25, "quantizer_dropout": 1.0}
_TRANSFORMER_DEFAULTS = {
    "causal": True, "conv_layout": True, "d_model": 256, "dim_feedforward": 1024, "gating": "none",
    "layer_scale": 0.01, "max_period": 10000, "norm": "layer_norm", "num_heads": 4,
    "positional_embedding": "rope",
}
_TRANSFORMER_REQUIRED = ("input_dimension", "output_dimension", "num_layers")
# (patch size after the transformer, input dim, output dim, layers, context seconds) of the released encoder.
_NANO_ENCODER = ((240, None), (2, (240, 384, 4, 4.0)), (2, (768, 384, 2, 6.0)), (2, (768, 384, 2, 8.0)),
                 (4, (768, 192, 4, 10.0)))


def normalize_compute_dtype(value: Any) -> str:
    """Return the canonical compute dtype name ("fp32", "bf16" or "fp16").

    Args:
        value: a name ("fp32", "bf16", "fp16", or "float32"/"bfloat16"/"float16"), a ``torch.dtype`` or None (fp32).

    Raises:
        ValueError: for anything else.
    """
    if value is None:
        return "fp32"
    key = str(value).lower().removeprefix("torch.")
    if key not in _COMPUTE_DTYPE_ALIASES:
        raise ValueError(f"compute_dtype={value!r} is not supported; allowed: {', '.join(COMPUTE_DTYPES)}")
    return _COMPUTE_DTYPE_ALIASES[key]


def normalize_attention_implementation(value: Any) -> str:
    """Validate an attention implementation name.

    Raises:
        ValueError: when ``value`` is not one of ``ATTENTION_IMPLEMENTATIONS``.
    """
    if value not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention_implementation={value!r} is not supported; allowed: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    return value


def _transformer_entry(input_dimension: int, output_dimension: int, num_layers: int, context: float) -> dict:
    entry = {"module_type": "Transformer", "context_duration": context, "input_dimension": input_dimension,
             "output_dimension": output_dimension, "num_layers": num_layers}
    entry.update(_TRANSFORMER_DEFAULTS)
    return dict(sorted(entry.items()))


def default_encoder_kwargs() -> list[dict]:
    """The released Nano encoder stack (9 modules)."""
    stack: list[dict] = []
    for patch_size, transformer in _NANO_ENCODER:
        if transformer is not None:
            stack.append(_transformer_entry(*transformer))
        stack.append({"module_type": "PatchedPretransform", "patch_size": patch_size})
    return stack


def mirror_stack(entries: list[dict]) -> list[dict]:
    """Reverse a stack and swap each Transformer's input/output dimensions (builds a decoder from an encoder)."""
    mirrored = []
    for entry in reversed(entries):
        entry = copy.deepcopy(entry)
        if entry.get("module_type") == "Transformer":
            entry["input_dimension"], entry["output_dimension"] = entry["output_dimension"], entry["input_dimension"]
        mirrored.append(entry)
    return mirrored


def _check_positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}.{name}={value!r} must be a positive integer")


def _validate_transformer(where: str, entry: dict) -> None:
    for name in _TRANSFORMER_REQUIRED + ("d_model", "num_heads", "dim_feedforward"):
        _check_positive_int(where, name, entry.get(name))
    if entry["d_model"] % entry["num_heads"] or (entry["d_model"] // entry["num_heads"]) % 2:
        raise ValueError(
            f"{where}: d_model={entry['d_model']} must be divisible by num_heads={entry['num_heads']} "
            "into an even head dimension"
        )
    allowed = {"causal": (True,), "norm": ("layer_norm",), "gating": ("none",),
               "positional_embedding": ("rope", "none")}
    for name, values in allowed.items():
        if entry.get(name) not in values:
            raise ValueError(f"{where}.{name}={entry.get(name)!r} is not supported; allowed: {list(values)}")
    context = entry.get("context_duration")
    if isinstance(context, bool) or not isinstance(context, (int, float)) or context <= 0:
        raise ValueError(f"{where}.context_duration={context!r} must be a positive number of seconds")
    scale = entry.get("layer_scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"{where}.layer_scale={scale!r} must be a number or null")
    if not isinstance(entry.get("max_period"), (int, float)) or entry["max_period"] <= 1:
        raise ValueError(f"{where}.max_period={entry.get('max_period')!r} must be a number > 1")


def _normalize_stack(name: str, entries: Any, fallback_context: float) -> list[dict]:
    if not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"{name} must be a non-empty list of module entries, got {entries!r}")
    stack = []
    for index, raw in enumerate(entries):
        where = f"{name}[{index}]"
        if not isinstance(raw, dict) or raw.get("module_type") not in MODULE_TYPES:
            raise ValueError(f"{where}={raw!r} must be a dict with module_type in {list(MODULE_TYPES)}")
        entry = dict(raw)
        if entry["module_type"] == "PatchedPretransform":
            _check_positive_int(where, "patch_size", entry.get("patch_size"))
        else:
            for key, value in _TRANSFORMER_DEFAULTS.items():
                entry.setdefault(key, value)
            if entry.get("context_duration") is None:
                entry["context_duration"] = fallback_context
            _validate_transformer(where, entry)
        stack.append(entry)
    return stack


class MossAudioTokenizerConfig(PretrainedConfig):
    r"""Configuration of ``MossAudioTokenizerModel``.

    Args:
        sampling_rate: per-channel sample rate (alias ``sample_rate``).
        downsample_rate: samples per channel per code frame.
        number_channels: waveform channels (legacy alias ``channels_numbers``).
        enable_channel_interleave: flatten the channels into one stream (L0 R0 L1 R1 ...) before the codec.
        causal_transformer_context_duration: context (seconds) for Transformer entries that lack one.
        attention_implementation: "sdpa" or "flash_attention_2" (legacy alias ``attention_backend``).
        compute_dtype: "fp32", "bf16" or "fp16" (legacy alias ``codec_compute_dtype``).
        code_dim: informational, equals ``quantizer_kwargs["input_dim"]``.
        encoder_kwargs / decoder_kwargs: module stacks in execution order.
        reversed_decoder_kwargs: mirror of the decoder, used only when ``decoder_kwargs`` is absent.
        quantizer_type / quantizer_kwargs: the residual LFQ quantizer.

    Raises:
        ValueError: on unsupported values or inconsistent stacks, naming the field.
    """

    model_type = "moss-audio-tokenizer"
    attribute_map = {"sample_rate": "sampling_rate"}
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this code (a remote-code folder)

    def __init__(
        self,
        sampling_rate: int = 48000,
        downsample_rate: int = 3840,
        number_channels: int = 2,
        enable_channel_interleave: bool = True,
        causal_transformer_context_duration: float = 10.0,
        attention_implementation: str = "sdpa",
        compute_dtype: str = "fp32",
        code_dim: int = 768,
        encoder_kwargs: list[dict] | None = None,
        decoder_kwargs: list[dict] | None = None,
        reversed_decoder_kwargs: list[dict] | None = None,
        quantizer_type: str = "rlfq",
        quantizer_kwargs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)
        kwargs.pop("version", None)
        sampling_rate = self._pop_alias(kwargs, "sample_rate", sampling_rate, 48000)
        number_channels = self._pop_alias(kwargs, "channels_numbers", number_channels, 2)
        attention_implementation = self._pop_alias(kwargs, "attention_backend", attention_implementation, "sdpa")
        compute_dtype = self._pop_alias(kwargs, "codec_compute_dtype", compute_dtype, "fp32")

        self.sampling_rate = sampling_rate
        self.downsample_rate = downsample_rate
        self.number_channels = number_channels
        self.enable_channel_interleave = bool(enable_channel_interleave)
        self.causal_transformer_context_duration = causal_transformer_context_duration
        self.attention_implementation = normalize_attention_implementation(attention_implementation)
        self.compute_dtype = normalize_compute_dtype(compute_dtype)
        self.code_dim = code_dim
        if encoder_kwargs is None:
            encoder_kwargs = default_encoder_kwargs()
        if decoder_kwargs is None:
            decoder_kwargs = (mirror_stack(reversed_decoder_kwargs) if reversed_decoder_kwargs is not None
                              else mirror_stack(encoder_kwargs))
        self.encoder_kwargs = _normalize_stack("encoder_kwargs", encoder_kwargs, causal_transformer_context_duration)
        self.decoder_kwargs = _normalize_stack("decoder_kwargs", decoder_kwargs, causal_transformer_context_duration)
        if reversed_decoder_kwargs is not None:
            self.reversed_decoder_kwargs = copy.deepcopy(reversed_decoder_kwargs)
        self.quantizer_kwargs = self._resolve_quantizer(quantizer_type, quantizer_kwargs)
        self.quantizer_type = self.quantizer_kwargs["quantizer_type"]
        super().__init__(**kwargs)
        self._validate()

    @staticmethod
    def _pop_alias(kwargs: dict, legacy: str, value: Any, default: Any) -> Any:
        """Apply a legacy alias when the modern field still holds its default (upstream's rule)."""
        if legacy not in kwargs:
            return value
        legacy_value = kwargs.pop(legacy)
        return legacy_value if value == default else value

    @staticmethod
    def _resolve_quantizer(quantizer_type: str, quantizer_kwargs: dict | None) -> dict:
        resolved = dict(_QUANTIZER_DEFAULTS, **_QUANTIZER_TRAINING_DEFAULTS)
        resolved.update(quantizer_kwargs or {})
        resolved["quantizer_type"] = resolved.get("quantizer_type") or quantizer_type
        if resolved["quantizer_type"] not in QUANTIZER_TYPES:
            raise ValueError(
                f"quantizer_type={resolved['quantizer_type']!r} is not supported; allowed: {list(QUANTIZER_TYPES)}"
            )
        for name in _QUANTIZER_DEFAULTS:
            _check_positive_int("quantizer_kwargs", name, resolved[name])
        return resolved

    @property
    def frame_rate(self) -> float:
        """Code frames per second (12.5 for the released model)."""
        return self.sampling_rate / self.downsample_rate

    @property
    def num_quantizers(self) -> int:
        """Number of residual quantizers (codebooks)."""
        return int(self.quantizer_kwargs.get("num_quantizers", 32))

    @property
    def codebook_size(self) -> int:
        """Entries per codebook."""
        return int(self.quantizer_kwargs.get("codebook_size", 4096))

    @property
    def interleave_factor(self) -> int:
        """How many waveform channels are flattened into the codec's single stream (1 without interleave)."""
        return self.number_channels if self.enable_channel_interleave and self.number_channels > 1 else 1

    def transformer_contexts(self) -> tuple[list[int], list[int]]:
        """Attention windows in tokens of every encoder and decoder Transformer, in stack order.

        Raises:
            ValueError: when the decoder does not return to the waveform rate.
        """
        rate = float(self.sampling_rate * self.interleave_factor)
        encoder = []
        for entry in self.encoder_kwargs:
            if entry["module_type"] == "Transformer":
                encoder.append(round(rate * entry["context_duration"]))
            else:
                rate /= entry["patch_size"]
        decoder = []
        for entry in self.decoder_kwargs:
            if entry["module_type"] == "Transformer":
                decoder.append(round(rate * entry["context_duration"]))
            else:
                rate *= entry["patch_size"]
        if round(rate) != round(self.sampling_rate * self.interleave_factor):
            raise ValueError(
                f"decoder_kwargs end at {rate} Hz but the waveform rate is "
                f"{self.sampling_rate * self.interleave_factor} Hz: the decoder patches must mirror the encoder's"
            )
        return encoder, decoder

    def _validate(self) -> None:
        _check_positive_int("config", "sampling_rate", self.sampling_rate)
        _check_positive_int("config", "downsample_rate", self.downsample_rate)
        _check_positive_int("config", "number_channels", self.number_channels)
        self._check_stack_channels()
        hop = 1
        for entry in self.encoder_kwargs:
            hop *= entry["patch_size"] if entry["module_type"] == "PatchedPretransform" else 1
        if hop != self.downsample_rate * self.interleave_factor:
            raise ValueError(
                f"encoder patch sizes multiply to {hop}, expected downsample_rate * interleaved channels = "
                f"{self.downsample_rate * self.interleave_factor}"
            )
        self.transformer_contexts()

    def _check_stack_channels(self) -> None:
        channels = 1 if self.interleave_factor > 1 else self.number_channels
        for index, entry in enumerate(self.encoder_kwargs):
            channels = self._next_channels("encoder_kwargs", index, entry, channels, upsample=False)
        if channels != self.quantizer_kwargs["input_dim"]:
            raise ValueError(f"encoder_kwargs end with {channels} channels but quantizer_kwargs.input_dim is "
                             f"{self.quantizer_kwargs['input_dim']}")
        channels = self.quantizer_kwargs["output_dim"]
        for index, entry in enumerate(self.decoder_kwargs):
            channels = self._next_channels("decoder_kwargs", index, entry, channels, upsample=True)
        expected = 1 if self.interleave_factor > 1 else self.number_channels
        if channels != expected:
            raise ValueError(f"decoder_kwargs end with {channels} channels, expected {expected}")

    @staticmethod
    def _next_channels(name: str, index: int, entry: dict, channels: int, upsample: bool) -> int:
        if entry["module_type"] == "Transformer":
            if entry["input_dimension"] != channels:
                raise ValueError(f"{name}[{index}].input_dimension={entry['input_dimension']} but the previous "
                                 f"module produces {channels} channels")
            return entry["output_dimension"]
        patch = entry["patch_size"]
        if not upsample:
            return channels * patch
        if channels % patch:
            raise ValueError(f"{name}[{index}].patch_size={patch} does not divide the {channels} input channels")
        return channels // patch

    def to_dict(self) -> dict[str, Any]:
        """Serialise, also writing ``sample_rate`` (the released file carries both spellings)."""
        output = super().to_dict()
        output["sample_rate"] = self.sampling_rate
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict):
            # Why: transformers' custom_object_save treats any class name containing "Tokenizer" as a tokenizer and
            # writes a (slow, fast) pair, which AutoConfig/AutoModel cannot read back.
            output["auto_map"] = {key: _auto_map_entry(key, value) for key, value in auto_map.items()}
        return output


def _auto_map_entry(key: str, value: Any) -> Any:
    if key != "AutoTokenizer" and isinstance(value, (list, tuple)) and len(value) == 2 and value[1] is None:
        return value[0]
    return value
