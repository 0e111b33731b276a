"""The compiled frame step (compiled_step.py) against the eager step on a tiny model: the same codes for greedy and
seeded sampled decoding, one graph per batch bucket and no recompilation while generating, and the eager fallback,
chosen once, with its reason. Tracing uses dynamo with a counting backend (cheap); one test runs inductor itself
on a one-codebook frame."""

from __future__ import annotations

import pytest
import torch

import compiled_step
import linear_kernels
from model_runner import ModelRunner, RowInput
from pipeline_assets import tiny_tts
from sampling import SamplingParams

GREEDY = SamplingParams(max_new_frames=8, nq=2)
SAMPLED = SamplingParams(max_new_frames=8, nq=2, do_sample=True, audio_repetition_penalty=1.2, audio_top_k=50)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts compilations."""

    __name__ = "counting"

    def __init__(self) -> None:
        self.compiled = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1
        return graph.forward


@pytest.fixture(scope="module")
def model():
    return tiny_tts(push=0.0)


@pytest.fixture(autouse=True)
def _eager_by_default(model):
    compiled_step.disable(model)
    yield
    compiled_step.disable(model)


def _codes(model, compile, batch, params, frames=5, forced=2, seed=0):
    """Codes (frames, batch, n_vq) of a runner with `batch` rows, each with its own seeded generator."""
    runner = ModelRunner(model, 8, compile=compile)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    prompts = [torch.randint(0, 20, (4 + i, model.config.n_vq + 1), generator=torch.Generator().manual_seed(i))
               for i in range(batch)]
    for slot in range(batch):
        runner.begin(slot, 40)
    out = []
    for frame in range(frames):
        rows = [RowInput(slot, prompts[slot] if frame == 0 else None, params, generators[slot], frame < forced)
                for slot in range(batch)]
        out.append(runner.step(rows).codes)
    return torch.stack(out)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "seeded-sampled"])
def test_compiled_step_gives_eager_codes_with_one_graph_per_bucket(model, params):
    backend = CountingBackend()
    compiled_step.graphs_for(model, create=True, backend=backend)
    eager = _codes(model, False, 3, params)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _codes(model, True, 3, params)
        again = _codes(model, True, 3, params)  # a new runner (a new call) reuses the graph
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    assert backend.compiled == 1 and len(compiled_step.graphs_for(model).frames) == 1
    assert (eager[:, :, 2:] == model.config.audio_pad_token_id).all()  # nq=2: the other channels hold the pad
    assert len(set(eager[:, :, :2].flatten().tolist())) > 8  # codes that depend on the input (a test that can fail)


def test_batch_sizes_share_their_bucket_graph(model):
    backend = CountingBackend()
    graphs = compiled_step.graphs_for(model, create=True, backend=backend)
    assert [compiled_step.bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    with torch._dynamo.config.patch(error_on_recompile=True):
        three = _codes(model, True, 3, GREEDY, frames=3)
        four = _codes(model, True, 4, GREEDY, frames=3)
    assert backend.compiled == 1 and [key[0] for key in graphs.frames] == [4]
    assert torch.equal(three, four[:, :3])  # the padding rows do not change the real rows' codes
    assert torch.equal(four, _codes(model, False, 4, GREEDY, frames=3))


def test_model_setting_is_the_default_and_batch_invariant_runners_stay_eager(model):
    assert ModelRunner(model, 2).graphs is None and compiled_step.status(model) == "eager"
    compiled_step.enable(model, backend=CountingBackend())
    assert ModelRunner(model, 2).graphs is compiled_step.graphs_for(model)
    assert ModelRunner(model, 2, compile=False).graphs is None
    assert ModelRunner(model, 2, batch_invariant=True).graphs is None
    assert compiled_step.status(model).startswith("compiled (counting")
    with pytest.raises(ValueError, match="backend='tvm'"):
        compiled_step.enable(model, backend="tvm")


def test_old_torch_falls_back_to_eager_once_with_the_reason(model, monkeypatch):
    monkeypatch.setattr(compiled_step, "torch_version", lambda: (2, 2))
    compiled_step.enable(model, backend=CountingBackend())
    assert "older than 2.3" in compiled_step.status(model) and "fell back" in compiled_step.status(model)
    assert torch.equal(_codes(model, None, 2, GREEDY, frames=3), _codes(model, False, 2, GREEDY, frames=3))


def test_a_compile_error_switches_to_eager_and_says_why(model):
    def broken(graph, example_inputs):
        raise RuntimeError("no compiler today")

    broken.__name__ = "broken"
    compiled_step.enable(model, backend=broken)
    codes = _codes(model, None, 2, GREEDY, frames=3)
    assert torch.equal(codes, _codes(model, False, 2, GREEDY, frames=3))
    assert "no compiler today" in compiled_step.status(model) and compiled_step.graphs_for(model).problem


@pytest.mark.skipif(compiled_step.compile_problem() is not None, reason=str(compiled_step.compile_problem()))
def test_inductor_step_gives_eager_greedy_codes(model):
    params = SamplingParams(max_new_frames=4, nq=1)
    compiled_step.enable(model)  # inductor: one tiny one-codebook graph (seconds; cached on disk afterwards)
    assert torch.equal(_codes(model, None, 1, params, frames=3), _codes(model, False, 1, params, frames=3))
    assert compiled_step.status(model) == "compiled (inductor, 1 graphs)"


def test_golden_greedy_codes_through_the_compiled_step():
    np = pytest.importorskip("numpy")
    from conftest import shared_path
    from modeling_moss_tts_nano import MossTTSNanoForCausalLM

    golden = dict(np.load(shared_path("golden", "tts_tiny", "golden.npz")))
    model = MossTTSNanoForCausalLM.from_pretrained(shared_path("golden", "tts_tiny")).eval()
    model.set_attention_implementation("sdpa")
    backend = CountingBackend()
    compiled_step.enable(model, backend=backend)
    ids, mask = torch.from_numpy(golden["batch_input_ids"]), torch.from_numpy(golden["batch_attention_mask"])
    out = model.generate(ids, mask, max_new_frames=12, do_sample=False, audio_repetition_penalty=1.2)
    assert torch.equal(out.audio_token_ids, torch.from_numpy(golden["greedy_sdpa_kv1"]))
    assert backend.compiled == 1


def _int8_tiny():
    int8 = tiny_tts()
    try:
        int8.set_weight_precision("int8")
    except RuntimeError as error:
        pytest.skip(f"no int8 engine here: {error}")
    return int8


def test_int8_weights_stay_int8_inside_the_graph(monkeypatch):
    int8 = _int8_tiny()
    calls = []
    product = linear_kernels.PrecisionLinear._product
    monkeypatch.setattr(linear_kernels.PrecisionLinear, "_product",
                        lambda self, x, packed: calls.append((self, packed is not None)) or product(self, x, packed))
    backend = CountingBackend()
    compiled_step.enable(int8, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = _codes(int8, None, 2, GREEDY, frames=3)
    local_layers = set(int8.local_transformer.modules())
    in_graph = [int8_copy for layer, int8_copy in calls if layer in local_layers]
    eager = _codes(int8, False, 2, GREEDY, frames=3)
    assert torch.equal(compiled, eager) and backend.compiled == 1
    assert compiled_step.status(int8) == "compiled (counting, 1 graphs)"
    # the local decoder runs only inside the graph: its products went through the operator to the int8 copies
    assert in_graph and all(in_graph)
    int8.set_weight_precision("float32")  # the same graph now runs the float32 weights: different logits
    layer = next(m for m in int8.local_transformer.modules() if isinstance(m, linear_kernels.PrecisionLinear))
    assert linear_kernels._int8_owner(layer.weight) is None


def test_int8_owner_table_follows_the_layer():
    int8 = _int8_tiny()
    layer = next(m for m in int8.local_transformer.modules() if isinstance(m, linear_kernels.PrecisionLinear))
    assert linear_kernels._int8_owner(layer.weight) is layer
    x = torch.randn(1, layer.in_features)
    with torch.inference_mode():
        assert torch.equal(linear_kernels._graph_product(x, layer.weight, layer.bias), layer(x))
        other = torch.randn_like(layer.weight)  # a weight no int8 layer owns: the float32 product
        assert torch.equal(linear_kernels._graph_product(x, other, None), linear_kernels.linear(x, other))
    int8.float()  # a cast rebuilds the int8 copy for the (same or new) weight, and the table follows
    assert linear_kernels._int8_owner(layer.weight) is layer
    key = (layer.weight.data_ptr(), tuple(layer.weight.shape))
    del int8, layer
    import gc
    gc.collect()
    assert key not in linear_kernels._INT8_OWNERS  # a freed weight leaves the table


def test_int8_without_this_modules_operator_runs_eager_and_says_why(monkeypatch):
    int8 = _int8_tiny()
    monkeypatch.setattr(linear_kernels, "_GRAPH_LIBRARY", None)  # the operator belongs to another copy
    backend = CountingBackend()
    compiled_step.enable(int8, backend=backend)
    assert torch.equal(_codes(int8, None, 2, GREEDY, frames=2), _codes(int8, False, 2, GREEDY, frames=2))
    assert backend.compiled == 0 and "weight precision int8" in compiled_step.status(int8)


def _within_float32_tolerance(reference, logits) -> None:
    """verify_npu's float32 limits for teacher-forced logits: cosine, max abs difference relative to the logit scale,
    and argmax agreement."""
    from verification_metrics import cosine_similarity, max_abs_difference, tolerance_for

    tolerance = tolerance_for("float32")
    for kind in ("text", "audio"):
        ref, got = getattr(reference, kind), getattr(logits, kind)
        assert cosine_similarity(ref, got) >= tolerance.min_cosine, kind
        assert max_abs_difference(ref, got) / max(1.0, float(ref.abs().max())) <= tolerance.max_abs_rel, kind
    agreement = float((logits.argmax_codes() == reference.argmax_codes()).double().mean())
    assert agreement >= tolerance.min_argmax_agreement


def test_teacher_forced_logits_through_the_compiled_frame_match_eager(model):
    from teacher_forcing import teacher_forced_logits

    generator = torch.Generator().manual_seed(7)
    rows = torch.full((2, 6, model.config.n_vq + 1), model.config.audio_pad_token_id)
    rows[..., 0] = torch.randint(10, 1000, (2, 6), generator=generator)
    frames = torch.randint(0, 1024, (2, 5, model.config.n_vq), generator=generator)
    backend = CountingBackend()
    compiled_step.enable(model, backend=backend)
    eager = teacher_forced_logits(model, rows, None, frames, nq=3, compile=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        graphed = teacher_forced_logits(model, rows, None, frames, nq=3)  # the model's setting: compiled
        again = teacher_forced_logits(model, rows, None, frames, nq=3)
    assert eager.step == "eager" and graphed.step == "compiled (counting, 1 graphs)"
    assert backend.compiled == 1 and [key[0] for key in compiled_step.graphs_for(model).frames] == ["teacher"]
    assert graphed.audio.shape == eager.audio.shape == (2, 5, 3, 1024) and torch.equal(again.audio, graphed.audio)
    _within_float32_tolerance(eager, graphed)
    changed = frames.clone()
    changed[:, 0, 1] = (changed[:, 0, 1] + 1) % 1024  # the fed codes reach the graph (a test that can fail)
    other = teacher_forced_logits(model, rows, None, changed, nq=3)
    assert torch.equal(other.audio[:, 0, :2], graphed.audio[:, 0, :2])
    assert not torch.equal(other.audio[:, 0, 2], graphed.audio[:, 0, 2])


def test_teacher_forcing_falls_back_to_eager_with_the_reason(model, monkeypatch):
    from teacher_forcing import teacher_forced_logits

    monkeypatch.setattr(compiled_step, "torch_version", lambda: (2, 2))
    rows = torch.full((1, 4, model.config.n_vq + 1), model.config.audio_pad_token_id)
    rows[..., 0] = 11
    frames = torch.zeros(1, 2, model.config.n_vq, dtype=torch.long)
    logits = teacher_forced_logits(model, rows, None, frames, nq=2, compile=True)
    assert logits.step == "eager" and "older than 2.3" in compiled_step.graphs_for(model).problem
    assert torch.equal(logits.audio, teacher_forced_logits(model, rows, None, frames, nq=2, compile=False).audio)


@pytest.mark.skipif(compiled_step.compile_problem() is not None, reason=str(compiled_step.compile_problem()))
def test_golden_teacher_forced_logits_of_the_inductor_step_within_the_float32_tolerance():
    """The golden continuation (greedy, no repetition penalty): eager teacher forcing reproduces its codes, and the
    inductor-compiled frame gives logits within verify_npu's float32 tolerance of eager's."""
    np = pytest.importorskip("numpy")
    from conftest import shared_path
    from modeling_moss_tts_nano import MossTTSNanoForCausalLM
    from teacher_forcing import teacher_forced_logits

    golden = dict(np.load(shared_path("golden", "tts_tiny", "golden.npz")))
    model = MossTTSNanoForCausalLM.from_pretrained(shared_path("golden", "tts_tiny")).eval()
    model.set_attention_implementation("sdpa")
    ids, mask = torch.from_numpy(golden["cont_input_ids"]), torch.from_numpy(golden["cont_attention_mask"])
    codes = torch.from_numpy(golden["greedy_cont_rp1"])
    assert torch.equal(teacher_forced_logits(model, ids, mask, codes, compile=False).argmax_codes(), codes)
    eager = teacher_forced_logits(model, ids, mask, codes, nq=4, compile=False)
    compiled_step.enable(model)  # inductor: one teacher-forcing graph (4 codebooks keep its compile short)
    graphed = teacher_forced_logits(model, ids, mask, codes, nq=4)
    assert graphed.step == "compiled (inductor, 1 graphs)" and graphed.audio.shape == (1, 12, 4, 1024)
    _within_float32_tolerance(eager, graphed)
