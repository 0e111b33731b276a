"""MOSS-TTS-Nano: embeddings, the global and local GPT-2 style decoders, the tied heads and the public API.

A model input is a tensor of rows (B, T, n_vq + 1): column 0 a text-token id, columns 1..n_vq audio codes (or the
pad code). The global decoder turns rows into one hidden state per frame; the local decoder expands the last one
into a text decision (continue / audio_end) and n_vq codes (docs/model.md). Generation lives in generation.py and
engine_core.py, the checks of a caller's inputs in model_inputs.py, `inference` / `inference_stream` (text in,
audio out) in synthesis_methods.py.
"""

from __future__ import annotations

if not __package__:  # imported by file name from a clone's root: become a package member (see repo_imports.py)
    __import__("repo_imports").adopt(globals())

import dataclasses
import inspect
import logging
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .attention import ATTENTION_FUNCTIONS, AttentionFunction, build_attention_mask, check_attention_name
from .configuration_moss_tts_nano import MossTTSNanoConfig
from .cpu_fast_paths import cpu_fast_paths_enabled, cpu_kernel
from .engine_core import generate_frames
from .generation import GenerationOutput
from .gpt2_decoder import GPT2Decoder, KernelPlan, resolve_kernel_plan
from .kv_cache import KVCache, positions_from_mask
from .linear_kernels import WEIGHT_PRECISIONS, PrecisionLinear
from .model_inputs import check_attention_mask, check_forward_inputs, check_generation_inputs, check_input_ids
from .prompting import PromptTokenIds, build_prompt_batch
from .rotary import Rotation
from .sampling import SamplingParams
from .synthesis_methods import SynthesisMethods
from .torch_compat import add_load_state_dict_pre_hook, load_pickled_weights, pickled_only_weights

if TYPE_CHECKING:  # never runs. The one list of the other sibling modules: for a local checkpoint folder,
    # transformers 4.57's remote-code loader copies only the modules this file imports relatively, so every module
    # reachable from here is named once below (tests/test_loader_listing.py checks that none is missing).
    from .atomic_files import write_atomic
    from .audio_io import write_audio_atomic
    from .codec_loading import load_codec
    from .codec_output import decode_frames
    from .compiled_step import StepGraphs
    from .devices import resolve_device
    from .engine import SynthesisEngine
    from .failures import is_out_of_memory_error
    from .kernel_probes import npu_fusion_attention_fn
    from .model_runner import ModelRunner
    from .npu_probes import fusion_attention_limits
    from .openmp_runtime import release_idle_team
    from .pipeline import run_inference  # also imported on first use (synthesis_methods.pipeline_module)
    from .safe_checkpoint import UnsafeCheckpointError
    from .scheduler import Scheduler
    from .shared_resources import load_resources
    from .step_capture import graph_api
    from .synthesis_request import SynthesisRequest
    from .text_chunking import split_text_into_chunks
    from .tokenization_moss_tts_nano import MossTTSNanoSentencePieceTokenizer
    from .value_bounds import SEED_LIMIT

logger = logging.getLogger(__name__)

# Upstream's method defaults, written once in SamplingParams; generate / generate_stream take theirs from here.
_DEFAULTS = SamplingParams()

# transformers 5.x declares tied parameters as {target: source}; 4.x as a list of target patterns.
_TIES_AS_MAPPING = hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")


@dataclass
class MossTTSNanoOutput:
    """Output of `MossTTSNanoForCausalLM.forward` (ModelOutput-like: attributes, `out["name"]`, `out[i]`, to_tuple).

    Why not transformers' ModelOutput: 5.x renames a `past_key_values` field to `cache` (with warnings and broken
    string indexing); this plain dataclass behaves the same under every transformers version.

    Attributes:
        last_hidden_state: (B, T, hidden) global decoder output after ln_f (zero on padded rows).
        past_key_values: the `KVCache` holding every row so far (when caching), else None.
        hidden_states: embeddings, each block's output and the final output (when requested), else None.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        """The fields that are not None, in order."""
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key: Union[int, str]) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


class MossTTSNanoForCausalLM(PreTrainedModel, SynthesisMethods):
    """MOSS-TTS-Nano text-to-speech model (global decoder over frames + local decoder over codebooks)."""

    config_class = MossTTSNanoConfig
    base_model_prefix = "moss_tts_nano"  # no submodule has this name: checkpoint keys are used as they are
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    # Why: transformers must never reject a configured backend name; this model resolves names itself per device.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    # Some released checkpoints carry an unused local token embedding; drop it quietly.
    _keys_to_ignore_on_load_unexpected = [r"^local_transformer\.wte\.weight$"]

    def __init__(self, config: MossTTSNanoConfig) -> None:
        super().__init__(config)
        gpt2 = config.gpt2_config
        hidden = gpt2.n_embd
        self.transformer = GPT2Decoder(gpt2, gpt2.n_layer, with_token_embedding=True)
        self.local_transformer = GPT2Decoder(gpt2, config.local_transformer_layers, with_token_embedding=False)
        self.audio_embeddings = nn.ModuleList(nn.Embedding(config.audio_vocab_size, hidden) for _ in range(config.n_vq))
        self.text_lm_head = nn.Linear(hidden, gpt2.vocab_size, bias=False)
        self.audio_lm_heads = nn.ModuleList(
            nn.Linear(hidden, config.audio_vocab_size, bias=False) for _ in range(config.n_vq)
        )
        ties = {"text_lm_head.weight": "transformer.wte.weight"}
        ties.update({f"audio_lm_heads.{i}.weight": f"audio_embeddings.{i}.weight" for i in range(config.n_vq)})
        self._tied_weights_keys = ties if _TIES_AS_MAPPING else [rf"^{k}$".replace(".", r"\.") for k in ties]
        self._kernel_plans: dict[tuple[torch.device, torch.dtype, bool], KernelPlan] = {}
        add_load_state_dict_pre_hook(self, _drop_local_token_embedding)
        self.post_init()  # ties the heads (transformers 5.x from `_tied_weights_keys`, 4.x through `_tie_weights`)

    # ------------------------------------------------------------------------------------------------ weights

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, plus the released ``pytorch_model.bin`` on torch < 2.6.

        There transformers refuses to torch.load a .bin (CVE-2025-32434). A checkpoint whose only weights are a single
        ``pytorch_model.bin`` is then read by ``safe_checkpoint.py`` (a plain state dict, without unpickling) and
        handed over as ``state_dict``; anything else in the file raises ``UnsafeCheckpointError``. The Auto classes
        (``trust_remote_code=True``) come through here too.
        """
        path = pretrained_model_name_or_path
        pickled = None if kwargs.get("state_dict") is not None else pickled_only_weights(path, **kwargs)
        if pickled is None:
            return super().from_pretrained(path, *model_args, **kwargs)
        config = kwargs.pop("config", None)
        if not isinstance(config, PretrainedConfig):
            config = cls.config_class.from_pretrained(config or path, **{
                k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision", "subfolder") if k in kwargs})
        kwargs.update(config=config, state_dict=load_pickled_weights(pickled))
        result = super().from_pretrained(None, *model_args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result  # a tuple with output_loading_info=True
        model.name_or_path = model.config._name_or_path = str(path)  # where tokenizer and codec are looked for
        return result

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.text_lm_head

    def _tie_weights(self) -> None:
        """Tie text_lm_head to transformer.wte and audio_lm_heads.i to audio_embeddings.i (docs/model.md, Weights)."""
        self.text_lm_head.weight = self.transformer.wte.weight
        for head, embedding in zip(self.audio_lm_heads, self.audio_embeddings):
            head.weight = embedding.weight

    @property
    def weight_precision(self) -> str:
        """"float32", or "int8" after `set_weight_precision("int8")`."""
        return next(m.weight_precision for m in self.modules() if isinstance(m, PrecisionLinear))

    def set_weight_precision(self, precision: str) -> None:
        """Opt-in reduced-precision weights for the Linear layers of both decoders (CPU, float32 model).

        "int8": each of those Linear layers also keeps a packed int8 copy of its weight (per output channel) and
        runs from it with dynamically quantized activations (fbgemm); ~1/4 of the weight bytes per frame, so faster
        where generation is memory-bound, at a small accuracy cost (teacher-forced logits stay close to float32;
        see tests/test_generation_speedups.py). Embeddings, LayerNorms, attention, the heads and sampling stay
        float32 (the audio heads would carry much of the int8 error for a few percent of the time). The parameters
        and state_dict are untouched, so "float32" switches back exactly. Set the precision again after changing
        weights; moving or casting the model off CPU float32 returns it to float32.

        Args:
            precision: one of `WEIGHT_PRECISIONS` ("float32", "int8").

        Raises:
            ValueError: for an unknown precision.
            RuntimeError: for "int8" when the model is not float32 on CPU, torch lacks its x86 int8 engine, or
                MOSS_TTS_CPU_FAST_PATHS=0 (int8 is a CPU fast path).
        """
        if precision not in WEIGHT_PRECISIONS:
            raise ValueError(f"precision={precision!r} is not a known weight precision; valid: {WEIGHT_PRECISIONS}")
        for module in self.modules():
            if isinstance(module, PrecisionLinear):
                module.set_weight_precision(precision)

    # ------------------------------------------------------------------------------------------------ attention

    def set_attention_implementation(self, global_impl: str, local: Optional[str] = None) -> None:
        """Request attention backends; they are resolved per (device, dtype) on the next call. The one setter: the
        compatibility names below route here.

        Args:
            global_impl: backend of the global decoder, one of `ATTENTION_IMPLEMENTATIONS`.
            local: backend of the local decoder; None uses `global_impl` for both.

        Raises:
            ValueError: for an unknown name (the message lists the valid names).
        """
        check_attention_name(global_impl, "global_impl")
        local = global_impl if local is None else check_attention_name(local, "local")
        self.config.attn_implementation = global_impl
        self.config.local_transformer_attn_implementation = local
        self.config._attn_implementation_internal = global_impl
        getattr(self, "_kernel_plans", {}).clear()  # not made yet when transformers' __init__ hook calls this

    def get_attention_implementation(self) -> tuple[str, str]:
        """The requested (global, local) backend names, as accepted by `set_attention_implementation`."""
        return self.config.attn_implementation, self.config.local_transformer_attn_implementation

    # Compatibility names, each routed to `set_attention_implementation`.

    def _set_attention_implementation(self, global_impl: str, local_attn_implementation: Optional[str] = None) -> None:
        """Upstream's name (its drivers call it)."""
        self.set_attention_implementation(global_impl, local_attn_implementation)

    def set_attn_implementation(self, attn_implementation: Union[str, dict]) -> None:
        """transformers' public setter: one name (or {"": name}) for both decoders."""
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", self.config.attn_implementation)
        self.set_attention_implementation(attn_implementation)

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: Optional[Union[str, dict]], is_init_check: bool = False, **kwargs: Any
    ) -> str:
        """transformers' hook (`PreTrainedModel.__init__` passes the `attn_implementation` of from_pretrained): record
        an explicit request for the global decoder, never reject a known name; return the global request.

        Why: transformers validates names against its own registry and raises for flash_attention_2 without the
        package (e.g. on CPU); this model resolves names per device instead. The local decoder keeps its backend.
        """
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", None)
        if attn_implementation is not None:
            check_attention_name(attn_implementation)  # the error names the from_pretrained argument
            self.set_attention_implementation(attn_implementation, self.config.local_transformer_attn_implementation)
        return self.config.attn_implementation

    # ------------------------------------------------------------------------------------------------ kernels

    def kernel_plan(self) -> KernelPlan:
        """The kernels that run for the model's current device and dtype: attention backends, RoPE and linear kernels.

        Resolved once per (device, dtype, CPU fast-path setting, weight precision), then cached; a new attention
        request clears the cache.
        """
        weight = self.transformer.wte.weight
        precision = self.transformer.h[0].attn.c_attn.weight_precision  # every decoder Linear has the same
        key = (weight.device, weight.dtype, cpu_fast_paths_enabled(), precision)
        plan = self._kernel_plans.get(key)
        if plan is None:
            gpt2 = self.config.gpt2_config
            plan = resolve_kernel_plan(self.get_attention_implementation(), weight.device, weight.dtype,
                                       gpt2.n_head, gpt2.n_embd // gpt2.n_head)
            if precision == "int8":  # the decoder Linear layers run their packed int8 weights
                plan = dataclasses.replace(plan, linear=cpu_kernel("int8_weights"))
            self._kernel_plans[key] = plan
        return plan

    def resolved_attention_implementation(self) -> tuple[str, str]:
        """The (global, local) backends that run for the model's current device and dtype."""
        return self.kernel_plan().attention

    def rotation(self, decoder: nn.Module, positions: torch.Tensor) -> Rotation:
        """RoPE of `positions` (B, T) for `decoder` (the global or local one), with the planned kernel's tables."""
        weight = self.transformer.wte.weight
        return decoder.rotary.rotation(positions, self.kernel_plan().rope, weight.dtype)

    def attention_functions(self) -> tuple[AttentionFunction, AttentionFunction]:
        """The (global, local) attention backend functions for the current device and dtype (cached)."""
        global_name, local_name = self.resolved_attention_implementation()
        return ATTENTION_FUNCTIONS[global_name], ATTENTION_FUNCTIONS[local_name]

    # ------------------------------------------------------------------------------------------------ inputs

    def check_input_ids(self, input_ids: Any, name: str = "input_ids") -> torch.Tensor:
        """`model_inputs.check_input_ids` for this model's config: the rows as int64, or a ValueError."""
        return check_input_ids(self.config, input_ids, name)

    @staticmethod
    def check_attention_mask(attention_mask: Any, batch: int, length: int,
                             name: str = "attention_mask") -> Optional[torch.Tensor]:
        """`model_inputs.check_attention_mask`: the (batch, length) mask as bool, None for none, or a ValueError."""
        return check_attention_mask(attention_mask, batch, length, name)

    def embed_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """wte(col 0) + sum_i [col i+1 != pad] * audio_embeddings[i](col i+1), summed in channel order (B, T, H)."""
        hidden = self.transformer.wte(input_ids[..., 0])
        pad = self.config.audio_pad_token_id
        for channel, embedding in enumerate(self.audio_embeddings):
            codes = input_ids[..., channel + 1]
            present = codes != pad
            hidden = hidden + embedding(codes.masked_fill(~present, 0)) * present[..., None]
        return hidden

    # ------------------------------------------------------------------------------------------------ forward

    def run_global(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        cache: Optional[KVCache] = None,
        attend: Optional[AttentionFunction] = None,
        collect_hidden: bool = False,
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """Global decoder on embeddings (B, T, H) with padding mask (B, T) bool, appending to `cache` if given."""
        if cache is None:
            key_valid, positions = mask, positions_from_mask(mask)
        else:
            key_valid, positions = cache.extend_mask(mask)
        attn_mask = build_attention_mask(key_valid, embeds.shape[1])
        rope = self.rotation(self.transformer, positions)
        attend = attend if attend is not None else self.attention_functions()[0]
        return self.transformer(embeds, rope, attn_mask, attend, cache, collect_hidden)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[KVCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[MossTTSNanoOutput, tuple]:
        """Global decoder hidden states for rows.

        Args:
            input_ids: (B, T, n_vq + 1) rows.
            attention_mask: (B, T) for the new rows, or (B, past + T) covering the cache too (its last T columns
                are used); None means no padding.
            past_key_values: a `KVCache` from a previous call (it is extended in place).
            use_cache: return a cache (default: only when `past_key_values` is given).
            output_hidden_states: also return every layer's hidden states.
            return_dict: return a `MossTTSNanoOutput` (default) instead of a tuple.

        Returns:
            `MossTTSNanoOutput` with `last_hidden_state` (B, T, H), `past_key_values`, `hidden_states`.

        Raises:
            ValueError: for malformed rows, codes out of range, a mask of the wrong shape or a foreign cache.
        """
        input_ids, mask = check_forward_inputs(self.config, input_ids, attention_mask, past_key_values)
        batch, length = input_ids.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            weight = self.transformer.wte.weight
            cache = self.transformer.new_cache(batch, length, dtype=weight.dtype, device=weight.device)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None else False)
        hidden, states = self.run_global(self.embed_rows(input_ids), mask, cache, collect_hidden=output_hidden_states)
        output = MossTTSNanoOutput(last_hidden_state=hidden, past_key_values=cache, hidden_states=states)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------------------------------------ prompts

    @torch.inference_mode()
    def build_inference_input_ids(
        self,
        text_tokenizer: Any,
        text: Union[str, Sequence[str]],
        mode: str = "continuation",
        prompt_text: Optional[str] = None,
        prompt_audio_codes: Any = None,
        nq: Optional[int] = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Prompt rows for one text (or a left-padded batch for a list of texts), on the model's device.

        Args:
            text_tokenizer: a tokenizer with `encode(text, add_special_tokens=False)`.
            text: the text to speak, or a list of texts (same prompt for each).
            mode: "voice_clone" (prompt audio, no prompt text) or "continuation" (no prompt, or both).
            prompt_text: transcript of the prompt audio (continuation only).
            prompt_audio_codes: (T_ref, n_vq) codes of the reference / prompt audio.
            nq: codebooks in use (1..n_vq); prompt codes of higher channels become the pad code.

        Returns:
            (input_ids (B, T, n_vq + 1), attention_mask (B, T) bool).

        Raises:
            ValueError: for a mode rule violation, empty text, or malformed codes.
        """
        def encode(value: str) -> list[int]:
            return list(text_tokenizer.encode(value, add_special_tokens=False))

        input_ids, attention_mask = build_prompt_batch(encode, PromptTokenIds.from_config(self.config), text, mode,
                                                       prompt_text, prompt_audio_codes, nq)
        return input_ids.to(self.device), attention_mask.to(self.device)

    # ------------------------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate_stream(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        max_new_frames: int = _DEFAULTS.max_new_frames,
        do_sample: bool = _DEFAULTS.do_sample,
        text_temperature: float = _DEFAULTS.text_temperature,
        text_top_p: float = _DEFAULTS.text_top_p,
        text_top_k: int = _DEFAULTS.text_top_k,
        audio_temperature: float = _DEFAULTS.audio_temperature,
        audio_top_p: float = _DEFAULTS.audio_top_p,
        audio_top_k: int = _DEFAULTS.audio_top_k,
        audio_repetition_penalty: float = _DEFAULTS.audio_repetition_penalty,
        nq: Optional[int] = _DEFAULTS.nq,
        use_kv_cache: bool = True,
        min_new_frames: int = _DEFAULTS.min_new_frames,
        **extra: Any,
    ) -> Iterator[dict[str, Any]]:
        """Generate frame by frame, yielding each frame as it is produced.

        Args:
            input_ids: (B, T, n_vq + 1) left-padded prompt rows.
            attention_mask: (B, T), False on left padding; None means no padding.
            max_new_frames: at most this many frames (one per step).
            do_sample: sample (True) or greedy (False) for both the text decision and the codes.
            text_temperature, text_top_p, text_top_k: sampling of the continue / audio_end decision.
            audio_temperature, audio_top_p, audio_top_k: sampling of the codes.
            audio_repetition_penalty: penalty on codes this row already generated in the same channel.
            nq: codebooks to generate (1..n_vq, default all); higher channels hold the pad code.
            use_kv_cache: cached decoding (fast); False recomputes everything each step (reference path).
            min_new_frames: the first this many steps continue whatever the model decides (not upstream's; 0 by
                default; verify_npu.py uses it so that a smoke run exercises sampling on the device).
            extra: accepted for drop-in compatibility; `generator` (torch.Generator) is used, others are ignored.

        Yields:
            {"type": "frame", "step_index": int, "audio_token_ids": (B, n_vq), "active_mask": (B,) rows whose codes
            are real, "finished_mask": (B,) rows that chose audio_end}, then {"type": "final", "generation":
            GenerationOutput}.

        Raises:
            ValueError: for invalid rows, mask or sampling settings.
            RuntimeError: "Non-finite ..." when text or audio logits are NaN/inf.
        """
        params = SamplingParams(
            max_new_frames=max_new_frames,
            do_sample=do_sample,
            text_temperature=text_temperature,
            text_top_p=text_top_p,
            text_top_k=text_top_k,
            audio_temperature=audio_temperature,
            audio_top_p=audio_top_p,
            audio_top_k=audio_top_k,
            audio_repetition_penalty=audio_repetition_penalty,
            nq=nq,
            min_new_frames=min_new_frames,
        )
        generator = extra.pop("generator", None)
        if extra:
            logger.warning("generate ignores unknown keyword arguments: %s", ", ".join(sorted(extra)))
        input_ids, mask = check_generation_inputs(self.config, input_ids, attention_mask, params,
                                                  self.transformer.wte.weight.device)
        yield from generate_frames(self, input_ids, mask, params, use_kv_cache=use_kv_cache, generator=generator)

    @torch.inference_mode()
    def generate(
        self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any
    ) -> GenerationOutput:
        """Generate audio codes for a batch of prompt rows (the arguments and defaults of `generate_stream`).

        Returns:
            `GenerationOutput` with `audio_token_ids` (B, frames, n_vq), `prompt_input_ids`,
            `prompt_attention_mask`, `finished_mask` (B,) and `num_frames` (B,) real frames per row.

        Raises:
            ValueError: for invalid rows, mask or sampling settings.
            RuntimeError: "Non-finite ..." when text or audio logits are NaN/inf.
        """
        for event in self.generate_stream(input_ids, attention_mask, *args, **kwargs):
            if event["type"] == "final":
                return event["generation"]
        raise AssertionError("generate_stream ended without a final event")

    # One parameter list for both entry points: introspection shows generate_stream's (upstream's) signature.
    generate.__signature__ = inspect.signature(generate_stream).replace(return_annotation="GenerationOutput")


def _drop_local_token_embedding(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: released checkpoints may carry an unused `local_transformer.wte.weight`."""
    state_dict.pop(f"{prefix}local_transformer.wte.weight", None)


__all__ = ["MossTTSNanoForCausalLM", "MossTTSNanoOutput", "GenerationOutput", "MossTTSNanoConfig"]
