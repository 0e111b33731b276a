"""MOSS-Audio-Tokenizer-Nano: a causal transformer codec, 48 kHz stereo <-> 16 x 1024 codes at 12.5 Hz.

Encode: wav (B,2,T) -> zero-pad to 3840k -> interleave (B,1,2T') -> encoder -> (B,768,N) -> residual LFQ -> (16,B,N).
Decode: codes (nq,B,N) -> LFQ decode -> (B,768,N) -> decoder -> (B,1,7680N) -> de-interleave -> (B,2,3840N).
Runs on CPU, CUDA and Ascend NPU: attention is SDPA with boolean masks, ``compute_dtype`` is honoured with
``torch.autocast`` on the parameters' device type, and the quantizer always runs in float32. What runs the stacks
step by step (chunked calls, ``streaming()``, decode sessions) is the ``CodecStreaming`` mixin (codec_streaming.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .codec_checkpoint import (
    has_legacy_keys,
    load_checkpoint_state_dict,
    read_checkpoint_keys,
    remap_legacy_keys_in_place,
)
from .codec_inputs import chunk_size, check_codes, check_num_quantizers, check_waveform, pad_right, resolve_code_rows
from .codec_layers import LayerScale, PatchedPretransform, ProjectedTransformer, StackStreamState
from .codec_outputs import MossAudioTokenizerDecoderOutput, MossAudioTokenizerEncoderOutput, MossAudioTokenizerOutput
from .codec_quantizer import WeightNormConv1x1, ResidualLFQ, _WeightNormParameters
from .codec_session import MossAudioTokenizerDecodeSession, StreamingDecodeController
from .codec_streaming import CodecStreaming
from .configuration_moss_audio_tokenizer import (
    MossAudioTokenizerConfig,
    normalize_attention_implementation,
    normalize_compute_dtype,
)
from .safe_checkpoint import UnsafeCheckpointError  # noqa: F401  (used by torch_compat; listed for the loader)
from .torch_compat import add_load_state_dict_pre_hook, autocast_available, load_pickled_weights, pickled_only_weights

logger = logging.get_logger(__name__)

__all__ = [
    "MossAudioTokenizerDecodeSession",
    "MossAudioTokenizerDecoderOutput",
    "MossAudioTokenizerEncoderOutput",
    "MossAudioTokenizerModel",
    "MossAudioTokenizerOutput",
    "MossAudioTokenizerPreTrainedModel",
]

COMPUTE_TORCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Autocast dtypes honoured per device type (devices not listed: whatever torch.autocast supports there).
# Why CPU is bf16-only: the spec asks for bf16 on CPU; fp16 CPU autocast is slow and rarely what anyone wants.
AUTOCAST_DTYPES_BY_DEVICE = {"cpu": (torch.bfloat16,)}


class MossAudioTokenizerPreTrainedModel(PreTrainedModel):
    """Hugging Face plumbing: config class, checkpoint layout (no prefix) and from-scratch initialisation."""

    config_class = MossAudioTokenizerConfig
    _auto_class = "AutoModel"  # save_pretrained writes auto_map and copies this code (a remote-code folder)
    base_model_prefix = ""
    main_input_name = "input_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ProjectedTransformer", "ResidualLFQ"]
    _keep_in_fp32_modules = ["quantizer"]
    _keep_in_fp32_modules_strict = ["quantizer"]  # the quantizer always runs in float32 (also for bf16 loads)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Skips tensors the loader already filled (`_is_hf_initialized`), so loaded weights are never overwritten.
        def todo(param: torch.Tensor) -> bool:
            return param is not None and not getattr(param, "_is_hf_initialized", False)

        if isinstance(module, nn.LayerNorm):
            if todo(module.weight):
                module.weight.fill_(1.0)
            if todo(module.bias):
                module.bias.zero_()
        elif isinstance(module, LayerScale) and todo(module.scale):
            module.scale.fill_(module.init_value)
        elif isinstance(module, (nn.Linear, nn.Embedding)) and todo(module.weight):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, _WeightNormParameters) and todo(module.original1):
            module.original1.normal_(0.0, 0.02)
            module.original0.copy_(module.original1.norm(dim=(1, 2), keepdim=True))
        elif isinstance(module, WeightNormConv1x1) and todo(module.bias):
            module.bias.zero_()


class MossAudioTokenizerModel(MossAudioTokenizerPreTrainedModel, CodecStreaming):
    """The codec. Public API: ``batch_encode``, ``batch_decode``, ``encode``, ``decode``, ``forward``,
    ``streaming``, ``create_decode_session``; attributes ``sampling_rate``/``sample_rate``, ``number_channels``,
    ``downsample_rate``, ``frame_rate``."""

    # Decode sessions own their state (see `create_decode_session`). The TTS pipeline opens one session per request
    # on a shared codec only where a codec class says so; it runs any other (upstream's, one stream per object)
    # through this class over that object's weights (codec_loading.session_codec).
    independent_decode_sessions = True

    def __init__(self, config: MossAudioTokenizerConfig) -> None:
        super().__init__(config)
        self.sampling_rate = config.sampling_rate
        self.downsample_rate = config.downsample_rate
        self.number_channels = config.number_channels
        self.enable_channel_interleave = config.enable_channel_interleave
        self.causal_transformer_context_duration = min(
            e["context_duration"] for e in config.encoder_kwargs if e["module_type"] == "Transformer")
        encoder_contexts, decoder_contexts = config.transformer_contexts()
        self.encoder = self._build_stack(config.encoder_kwargs, encoder_contexts, upsample=False)
        self.quantizer = ResidualLFQ(**config.quantizer_kwargs)
        self.decoder = self._build_stack(config.decoder_kwargs, decoder_contexts, upsample=True)
        self._streaming_context: dict[str, StackStreamState] | None = None  # the streaming() context's state
        self._stream_decode = StreamingDecodeController(self)
        self.set_attention_implementation(config.attention_implementation)
        self.set_compute_dtype(config.compute_dtype)
        add_load_state_dict_pre_hook(self, self._remap_legacy_keys_hook)
        self.register_load_state_dict_post_hook(self._refresh_after_load_hook)
        self.post_init()

    @staticmethod
    def _build_stack(entries: list[dict], contexts: list[int], upsample: bool) -> nn.ModuleList:
        modules, contexts = [], iter(contexts)
        for entry in entries:
            if entry["module_type"] == "PatchedPretransform":
                modules.append(PatchedPretransform(entry["patch_size"], upsample))
            else:
                modules.append(ProjectedTransformer(entry, next(contexts)))
        return nn.ModuleList(modules)

    # ----------------------------------------------------------------------------------------------- loading

    @staticmethod
    def _remap_legacy_keys_hook(module, state_dict, prefix, *args) -> None:
        remap_legacy_keys_in_place(state_dict, prefix)

    @staticmethod
    def _refresh_after_load_hook(module, incompatible_keys) -> None:
        module.refresh_weight_norm()

    def refresh_weight_norm(self) -> None:
        """Recompute the cached weight-norm effective weights (done automatically when parameters change)."""
        for module in self.quantizer.weight_norm_modules():
            module.refresh()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "MossAudioTokenizerModel":
        """``PreTrainedModel.from_pretrained``, plus legacy key names (CODEC_SPEC §2) in local checkpoints, and the
        released ``pytorch_model.bin`` on torch < 2.6.

        A local checkpoint with legacy names is read here, renamed, and handed over as ``state_dict``. So is a
        checkpoint whose only weights are ``pytorch_model.bin`` where torch predates 2.6 (transformers refuses to
        torch.load it there): ``safe_checkpoint.py`` reads it without unpickling, or refuses it.
        """
        path, name = pretrained_model_name_or_path, None
        if kwargs.get("state_dict") is None and path is not None:
            pickled = pickled_only_weights(path, **kwargs)
            keys = read_checkpoint_keys(path) if pickled is None and os.path.isdir(path) else None
            if pickled is not None or (keys is not None and has_legacy_keys(keys)):
                state_dict = load_pickled_weights(pickled) if pickled else load_checkpoint_state_dict(path)
                remap_legacy_keys_in_place(state_dict)
                config = kwargs.pop("config", None)
                if not isinstance(config, PretrainedConfig):
                    config = MossAudioTokenizerConfig.from_pretrained(config or path)
                kwargs.update(config=config, state_dict=state_dict)
                name, path = str(path), None
        result = super().from_pretrained(path, *model_args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # a tuple with output_loading_info=True
        if name is not None:  # where the weights came from, as transformers records it
            model.name_or_path = model.config._name_or_path = name
        model.refresh_weight_norm()
        return result

    # -------------------------------------------------------------------------------------------- attributes

    @property
    def sample_rate(self) -> int:
        """Alias of ``sampling_rate``."""
        return self.sampling_rate

    @property
    def frame_rate(self) -> float:
        """Code frames per second."""
        return self.sampling_rate / self.downsample_rate

    @property
    def num_quantizers(self) -> int:
        return self.quantizer.num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def _interleave_factor(self) -> int:
        return self.number_channels if self.enable_channel_interleave and self.number_channels > 1 else 1

    def set_attention_implementation(self, name: str) -> None:
        """Select the attention backend for every attention layer.

        Args:
            name: "sdpa" or "flash_attention_2" (the latter runs SDPA with the exact window, logged once).

        Raises:
            ValueError: for any other name.
        """
        name = normalize_attention_implementation(name)
        if name == "flash_attention_2":
            logger.warning_once("attention_implementation='flash_attention_2' runs SDPA in this codec: flash-attn's "
                                "window admits one key too many for the released model")
        for module in self.modules():
            if hasattr(module, "attention_implementation") and module is not self:
                module.attention_implementation = name
        self.attention_implementation = name
        self.config.attention_implementation = name

    def set_compute_dtype(self, name: str | torch.dtype) -> None:
        """Set the autocast dtype of the encoder/decoder stacks ("fp32", "bf16" or "fp16"; the quantizer stays fp32).

        Raises:
            ValueError: for any other name.
        """
        name = normalize_compute_dtype(name)
        self.compute_dtype_name = name
        self.compute_dtype = COMPUTE_TORCH_DTYPES[name]
        self.config.compute_dtype = name

    def _compute_autocast(self, device: torch.device):
        dtype = self.compute_dtype
        if dtype is None:
            return contextlib.nullcontext()
        allowed = AUTOCAST_DTYPES_BY_DEVICE.get(device.type)
        if not autocast_available(device.type) or (allowed is not None and dtype not in allowed):
            logger.warning_once(f"compute_dtype={self.compute_dtype_name} is not available on {device.type}; "
                                "the codec runs in float32 there")
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ------------------------------------------------------------------------------------------------ stacks

    def _stages(self, stack: nn.ModuleList | None = None) -> list[ProjectedTransformer]:
        stacks = [self.encoder, self.decoder] if stack is None else [stack]
        return [m for s in stacks for m in s if isinstance(m, ProjectedTransformer)]

    def _run_stack(self, stack: nn.ModuleList, x: torch.Tensor, lengths: list[int] | None,
                   state: StackStreamState | None = None):
        """Run a stack one-shot (``lengths``, per row at the input rate, mask padding) or as one step of ``state``."""
        stage_states = None if state is None else iter(state.stages)
        for module in stack:
            if isinstance(module, PatchedPretransform):
                x = module(x)
                lengths = None if lengths is None else module.map_lengths(lengths)
            elif stage_states is not None:
                x = module(x, None, next(stage_states))
            else:
                padded = lengths is not None and any(n < x.shape[-1] for n in lengths)
                x = module(x, torch.tensor(lengths, device=x.device) if padded else None)
        return x, lengths

    def _interleave(self, wav: torch.Tensor) -> torch.Tensor:
        if self._interleave_factor == 1:
            return wav
        batch, channels, time = wav.shape
        return wav.transpose(1, 2).reshape(batch, 1, channels * time)  # (B, 1, C*T): L0 R0 L1 R1 ...

    def _deinterleave(self, x: torch.Tensor) -> torch.Tensor:
        if self._interleave_factor == 1:
            return x.float()
        batch, _, time = x.shape
        channels = self._interleave_factor
        return x.reshape(batch, time // channels, channels).transpose(1, 2).float()  # (B, C, T/C)

    def _encode_hidden(self, wav: torch.Tensor, lengths: list[int] | None, state: StackStreamState | None = None
                       ) -> tuple[torch.Tensor, list | None]:
        """Encoder stack; streams through ``state`` (default: the ``streaming()`` context's, if any)."""
        x = self._interleave(wav.to(self.device, torch.float32))  # (B, 1, C*T)
        if lengths is not None:
            lengths = [n * self._interleave_factor for n in lengths]
        with self._compute_autocast(x.device):
            hidden, lengths = self._run_stack(self.encoder, x, lengths, state or self._context_state("encoder"))
        return hidden.float(), lengths

    def _decode_embedding(self, embedding: torch.Tensor, frames: list[int] | None,
                          state: StackStreamState | None = None) -> torch.Tensor:
        """Decoder stack; streams through ``state`` (default: the ``streaming()`` context's, if any)."""
        with self._compute_autocast(embedding.device):
            x, _ = self._run_stack(self.decoder, embedding, frames, state or self._context_state("decoder"))
        return self._deinterleave(x)

    # --------------------------------------------------------------------------------------------- one-shot

    def _encode_batch(self, wav: torch.Tensor, lengths: list[int], num_quantizers: int):
        frame = self.downsample_rate
        padded = math.ceil(wav.shape[-1] / frame) * frame
        wav = F.pad(wav, (0, padded - wav.shape[-1]))
        hidden, frame_lengths = self._encode_hidden(wav, lengths)
        code_lengths = torch.tensor(frame_lengths, dtype=torch.int64, device=hidden.device)
        codes = self.quantizer.encode(hidden, code_lengths, num_quantizers)
        return MossAudioTokenizerEncoderOutput(codes, code_lengths, hidden)

    def _decode_batch(self, codes: torch.Tensor, lengths: list[int]) -> MossAudioTokenizerDecoderOutput:
        codes = codes.to(self.device)
        embedding = self.quantizer.decode(codes)  # (B, 768, N)
        audio = self._decode_embedding(embedding, list(lengths))
        audio_lengths = torch.tensor([n * self.downsample_rate for n in lengths], dtype=torch.int64,
                                     device=audio.device)
        return MossAudioTokenizerDecoderOutput(audio, audio_lengths)

    def _check_code_matrix(self, codes, name: str) -> torch.Tensor:
        return check_codes(codes, name, self.codebook_size, self.num_quantizers)

    def _pad_codes(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(nq, N_i)`` items -> ``(nq, n, max N_i)`` zero-padded on the model device."""
        return pad_right([item.to(self.device) for item in items]).transpose(0, 1)

    # --------------------------------------------------------------------------------------- public: encode

    @torch.inference_mode()
    def batch_encode(self, wav_list: Sequence[torch.Tensor], num_quantizers: int | None = None,
                     chunk_duration: float | None = None) -> MossAudioTokenizerEncoderOutput:
        """Encode waveforms of different lengths.

        Args:
            wav_list: non-empty list of float ``(channels, T_i)`` waveforms (mono models also take ``(T_i,)``).
            num_quantizers: codebooks to emit, 1..16 (None: all).
            chunk_duration: seconds per streaming chunk (a multiple of 0.08 s), or None for one-shot encoding.

        Returns:
            ``MossAudioTokenizerEncoderOutput``: codes ``(nq, B, N)``, valid frame lengths ``(B,)`` and encoder
            hidden states ``(B, 768, N)``. One-shot N is ceil(max T / 3840) (a partial last frame is padding);
            chunked N is the longest valid length.

        Raises:
            ValueError: bad waveforms (rank, channels, empty, NaN/Inf), ``num_quantizers`` or ``chunk_duration``.
        """
        if isinstance(wav_list, torch.Tensor) or not isinstance(wav_list, (list, tuple)) or not wav_list:
            raise ValueError("wav_list must be a non-empty list of (channels, T) waveforms")
        items = [check_waveform(w, i, self.number_channels) for i, w in enumerate(wav_list)]
        nq = check_num_quantizers(num_quantizers, self.num_quantizers)
        first = items[0]
        items = [item.to(first.device, first.dtype) for item in items]
        lengths = [item.shape[-1] for item in items]
        if chunk_duration is None:
            return self._encode_batch(pad_right(items), lengths, nq)
        chunk = chunk_size(chunk_duration, self.sampling_rate, self.downsample_rate)
        return self._encode_chunked(items, lengths, nq, chunk)

    @torch.inference_mode()
    def encode(self, input_values: torch.Tensor, padding_mask: torch.Tensor | None = None,
               num_quantizers: int | None = None, return_dict: bool | None = None,
               chunk_duration: float | None = None) -> MossAudioTokenizerEncoderOutput | tuple:
        """Encode a padded batch ``(B, C, T)``, one multi-channel item ``(C, T)`` or one mono item ``(T,)``.

        Args:
            input_values: the waveform(s).
            padding_mask: ``(B, T)`` (or ``(T,)`` for one item), nonzero on valid samples; lengths are its sums.
            num_quantizers, chunk_duration: as in ``batch_encode``.
            return_dict: False returns ``(audio_codes, audio_codes_lengths)``.

        Raises:
            ValueError: wrong shapes or the errors of ``batch_encode``.
        """
        values = torch.as_tensor(input_values)
        if values.dim() == 3:
            lengths = [values.shape[-1]] * values.shape[0]
            if padding_mask is not None:
                lengths = self._mask_lengths(padding_mask, (values.shape[0], values.shape[-1]))
            wav_list = [values[b, :, :n] for b, n in enumerate(lengths)]
        elif values.dim() in (1, 2):
            item = values
            if padding_mask is not None:
                item = item[..., : self._mask_lengths(padding_mask, (values.shape[-1],))[0]]
            wav_list = [item]
        else:
            raise ValueError(f"input_values has shape {tuple(values.shape)}; expected (B, C, T), (C, T) or (T,)")
        output = self.batch_encode(wav_list, num_quantizers=num_quantizers, chunk_duration=chunk_duration)
        if not self._use_return_dict(return_dict):
            return output.audio_codes, output.audio_codes_lengths
        return output

    @staticmethod
    def _mask_lengths(padding_mask, shape: tuple[int, ...]) -> list[int]:
        mask = torch.as_tensor(padding_mask)
        if tuple(mask.shape) != shape:
            raise ValueError(f"padding_mask has shape {tuple(mask.shape)}; expected {shape}")
        return [int(n) for n in mask.reshape(-1, shape[-1]).bool().sum(-1).tolist()]

    def _use_return_dict(self, return_dict: bool | None) -> bool:
        return getattr(self.config, "return_dict", True) if return_dict is None else return_dict

    # --------------------------------------------------------------------------------------- public: decode

    @torch.inference_mode()
    def batch_decode(self, codes_list: Sequence[torch.Tensor], num_quantizers: int | None = None,
                     chunk_duration: float | None = None, streaming: bool = False,
                     max_batch_size: int | None = None, finalize_indices: Sequence[int] | None = None,
                     reset_stream: bool = False, use_cuda_graph: bool = False) -> MossAudioTokenizerDecoderOutput:
        """Decode code matrices of different lengths.

        Args:
            codes_list: non-empty list of integer ``(nq_i, N_i)`` codes in ``[0, 1024)`` (N_i may be 0).
            num_quantizers: use the first n rows of every item (None: all items must have the same nq).
            chunk_duration: decode in chunks of this many seconds under ``streaming()`` (non-session), or None.
            streaming: decode incrementally through the model's stream session (see the module docs / spec §5):
                row i is logical row i of the stream, new rows are appended, ``finalize_indices`` (indices into
                the rows active before the call) are removed after decoding this call's frames.
            max_batch_size: slots of the stream session (first call; later only unchanged).
            finalize_indices: see ``streaming``.
            reset_stream: close any open stream session first.
            use_cuda_graph: accepted and ignored.

        Returns:
            ``MossAudioTokenizerDecoderOutput``: audio ``(n, channels, 3840 * max N_i)`` and ``audio_lengths`` =
            3840 * N_i. Streaming returns exactly 3840 samples per channel per decoded frame.

        Raises:
            ValueError: bad codes, ``num_quantizers``, ``chunk_duration`` or streaming arguments.
        """
        items, nq = resolve_code_rows(codes_list, num_quantizers, self.codebook_size, self.num_quantizers)
        if streaming:
            audio, audio_lengths = self._stream_decode.decode(items, max_batch_size, finalize_indices,
                                                              reset_stream, use_cuda_graph)
            return MossAudioTokenizerDecoderOutput(audio, audio_lengths.to(audio.device))
        if reset_stream:
            self._reset_batch_decode_streaming_state()
        if use_cuda_graph:
            logger.warning_once("use_cuda_graph=True is ignored: this codec decodes without CUDA graphs")
        lengths = [item.shape[-1] for item in items]
        if chunk_duration is not None:
            chunk = chunk_size(chunk_duration, self.sampling_rate, self.downsample_rate) // self.downsample_rate
            return self._decode_chunked(items, lengths, chunk)
        if max(lengths) == 0:
            audio = torch.zeros(len(items), self.number_channels, 0, device=self.device)
            return MossAudioTokenizerDecoderOutput(audio, torch.zeros(len(items), dtype=torch.int64,
                                                                      device=self.device))
        return self._decode_batch(self._pad_codes(items), lengths)

    @torch.inference_mode()
    def decode(self, audio_codes: torch.Tensor, padding_mask: torch.Tensor | None = None,
               return_dict: bool | None = None, chunk_duration: float | None = None,
               num_quantizers: int | None = None) -> MossAudioTokenizerDecoderOutput | tuple:
        """Decode ``(nq, B, N)`` codes (row lengths from ``padding_mask (B, N)``) or one ``(nq, N)`` matrix.

        Returns:
            ``MossAudioTokenizerDecoderOutput`` or, with ``return_dict=False``, the 1-tuple ``(audio,)``.

        Raises:
            ValueError: bad shapes, codes, or ``num_quantizers`` larger than nq.
        """
        codes = torch.as_tensor(audio_codes)
        if codes.dim() == 2:
            items = [codes]
            if padding_mask is not None:
                items = [codes[:, : self._mask_lengths(padding_mask, (codes.shape[-1],))[0]]]
        elif codes.dim() == 3:
            lengths = [codes.shape[-1]] * codes.shape[1]
            if padding_mask is not None:
                lengths = self._mask_lengths(padding_mask, (codes.shape[1], codes.shape[-1]))
            items = [codes[:, b, :n] for b, n in enumerate(lengths)]
        else:
            raise ValueError(f"audio_codes has shape {tuple(codes.shape)}; expected (nq, B, N) or (nq, N)")
        if num_quantizers is not None and num_quantizers > codes.shape[0]:
            raise ValueError(f"num_quantizers={num_quantizers} exceeds the {codes.shape[0]} quantizer rows given")
        output = self.batch_decode(items, num_quantizers=num_quantizers, chunk_duration=chunk_duration)
        return output if self._use_return_dict(return_dict) else (output.audio,)

    @torch.inference_mode()
    def forward(self, input_values: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                audio_codes: torch.Tensor | None = None, num_quantizers: int | None = None,
                return_dict: bool | None = None) -> MossAudioTokenizerOutput | tuple:
        """Encode ``input_values`` and decode all N frames (or decode the given ``audio_codes``).

        Returns:
            ``MossAudioTokenizerOutput`` or the tuple ``(audio_codes, audio, audio_lengths)``.

        Raises:
            ValueError: neither ``input_values`` nor ``audio_codes`` is given, or the errors of encode/decode.
        """
        if input_values is None and audio_codes is None:
            raise ValueError("forward needs input_values (to encode and decode) or audio_codes (to decode)")
        codes_lengths = None
        if input_values is not None and audio_codes is None:
            encoded = self.encode(input_values, padding_mask, num_quantizers=num_quantizers, return_dict=True)
            audio_codes, codes_lengths = encoded.audio_codes, encoded.audio_codes_lengths
            frames = audio_codes.shape[-1]
            output = self._decode_batch(audio_codes, [frames] * audio_codes.shape[1])
            audio, audio_lengths = output.audio, codes_lengths * self.downsample_rate
        else:
            decoded = self.decode(audio_codes, padding_mask, return_dict=True, num_quantizers=num_quantizers)
            audio, audio_lengths = decoded.audio, decoded.audio_lengths
        if not self._use_return_dict(return_dict):
            return audio_codes, audio, audio_lengths
        return MossAudioTokenizerOutput(audio, audio_lengths, audio_codes, codes_lengths)
