"""oneDNN on prepacked float32 weights (`linear_kernels.packed_onednn_weight`): the packed copy always follows the
weight it derives from, is built once even when threads race for it, stays out of what is saved, and gives a row
the same bits whatever the number of rows beside it."""

from __future__ import annotations

import copy
import io
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import linear_kernels
from linear_kernels import PACK_MIN_OUT_FEATURES, PACKED_MIN_ROWS, PrecisionLinear, batched_products, linear

pytestmark = pytest.mark.skipif(not linear_kernels.packed_onednn_usable(),
                                reason="this CPU/torch build runs no oneDNN products on packed weights (not x86-64, "
                                       "no oneDNN, or its products depend on the row count)")


def layer(seed: int = 0, features: int = 256) -> PrecisionLinear:
    torch.manual_seed(seed)
    return PrecisionLinear(features, max(PACK_MIN_OUT_FEATURES, features)).eval()


def rows(count: int, features: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, features, generator=torch.Generator().manual_seed(seed))


def test_a_batched_product_runs_on_the_packed_copy_and_matches_f_linear():
    module, x = layer(), rows(PACKED_MIN_ROWS + 1)
    with torch.no_grad():
        out = module(x)
    assert linear_kernels._PACKED.get(id(module.weight)) is not None
    torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", ["load_state_dict", "in_place", "parameter_data"])
def test_the_packed_copy_follows_every_change_of_the_weight(change):
    module, x = layer(0), rows(8)
    with torch.no_grad():
        module(x)  # packs the first weights
        other = layer(5)
        if change == "load_state_dict":
            module.load_state_dict(other.state_dict())
        elif change == "in_place":
            module.weight.mul_(-2.0)
        else:
            module.weight.data = other.weight.data.clone()
        out = module(x)
    # Without the version / storage check the stale packed copy gives the old weights' products.
    torch.testing.assert_close(out, F.linear(x, module.weight, module.bias), rtol=1e-5, atol=1e-5)


def test_threads_racing_for_the_first_product_pack_the_weight_once(monkeypatch):
    module, x = layer(), rows(8)
    calls, barrier = [], threading.Barrier(4)
    real = linear_kernels._reorder

    def counted(weight):  # slow enough that the other threads arrive while it packs
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return real(weight)

    monkeypatch.setattr(linear_kernels, "_reorder", counted)
    results, errors = [], []

    def run():
        try:
            barrier.wait()
            with torch.no_grad():
                results.append(module(x))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(calls) == 1
    for out in results:
        assert torch.equal(out, results[0])


def test_saving_copying_and_moving_never_see_the_packed_copy():
    module, x = layer(), rows(8)
    with torch.no_grad():
        module(x)
    buffer = io.BytesIO()
    torch.save(module, buffer)  # the packed oneDNN tensor is not picklable: it must not hang off the module
    assert set(module.state_dict()) == {"weight", "bias"}
    twin = copy.deepcopy(module)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), module(x), rtol=1e-6, atol=1e-6)
    module.to(torch.float64)  # leaving float32 drops the packed copy
    assert linear_kernels._PACKED.get(id(module.weight)) is None


def test_a_dropped_weight_takes_its_packed_copy_with_it():
    module = layer()
    with torch.no_grad():
        module(rows(8))
    key = id(module.weight)
    assert key in linear_kernels._PACKED
    del module
    assert key not in linear_kernels._PACKED


def test_in_batch_invariant_products_a_row_keeps_its_bits_at_every_row_count():
    weight = torch.randn(3 * PACK_MIN_OUT_FEATURES, 256, generator=torch.Generator().manual_seed(3))
    x = rows(12)
    with torch.no_grad(), batched_products(row_invariant=True):
        alone = linear(x[5:6], weight)
        for count in (2, 3, 7, 12):
            start = max(0, 6 - count)
            assert torch.equal(linear(x[start:start + count], weight)[5 - start], alone[0])


def test_the_kernel_plan_names_the_packed_products():
    assert linear_kernels.resolve_linear_kernel("cpu", torch.float32) == "split-matvec/onednn-packed"
