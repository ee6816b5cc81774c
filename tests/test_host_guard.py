"""The first-step guard: selection asked for, first draw not selected -> stop before the optimizer."""
import pytest
import torch

from helpers import fake_adapter

from immiscible_host.options import Settings
from immiscible_host.runtime import Runtime, SelectionNotApplied
from immiscible_host.wrappers import guarding_first_step


class FakeAccelerator:
    def __init__(self):
        self.steps = 0

    def backward(self, loss):
        self.steps += 1


def _runtime(k):
    rt = Runtime()
    rt.configure(Settings(k=k), "torch")
    return rt


def _accelerator(rt):
    adapter = fake_adapter(script="train_network.py")
    adapter._runtime = rt
    adapter.running_version = lambda: "v0.8.7"
    acc = FakeAccelerator()
    acc.backward = guarding_first_step(FakeAccelerator.backward, adapter.guard, adapter).__get__(acc)
    return acc


def test_selected_first_draw_trains_on():
    rt = _runtime(4)
    assert rt.select(torch.randn(2, 4, 4, 4), "point") is not None
    acc = _accelerator(rt)
    acc.backward(0.0)
    acc.backward(0.0)
    assert acc.steps == 2


def test_no_draw_through_the_selection_stops_before_the_first_step():
    rt = _runtime(8)
    acc = _accelerator(rt)
    with pytest.raises(SelectionNotApplied, match=r"--immiscible_k 8 .*train_network.py \(version v0.8.7\).*"
                                                  r"does not intercept.*install.py --check"):
        acc.backward(0.0)
    assert acc.steps == 0


def test_a_first_draw_that_fell_back_stops_the_run(monkeypatch):
    rt = _runtime(8)
    import immiscible

    def broken(*a, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(immiscible, "select_noise", broken)
    assert rt.select(torch.randn(2, 4), "train_util.get_noise") is None
    assert rt.stock_batches == 1
    with pytest.raises(SelectionNotApplied, match="kernel exploded"):
        _accelerator(rt).backward(0.0)


def test_later_failures_fall_back_and_are_counted(monkeypatch):
    rt = _runtime(8)
    acc = _accelerator(rt)
    rt.select(torch.randn(2, 4), "p")
    acc.backward(0.0)
    import immiscible

    monkeypatch.setattr(immiscible, "select_noise", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("later")))
    for _ in range(3):
        assert rt.select(torch.randn(2, 4), "p") is None
        acc.backward(0.0)
    assert acc.steps == 4 and rt.stock_batches == 3 and rt.first_draw_stock is None


@pytest.mark.parametrize("k", [1, None])
def test_off_never_stops(k):
    rt = Runtime() if k is None else _runtime(k)
    acc = _accelerator(rt)
    acc.backward(0.0)
    assert acc.steps == 1


def test_nan_latents_stop_with_a_data_message_not_install_advice():
    rt = _runtime(8)
    latents = torch.randn(2, 4, 4, 4)
    latents[1, 0, 0, 0] = float("nan")
    assert rt.select(latents, "train_util.get_noise") is None and rt.stock_batches == 1
    with pytest.raises(SelectionNotApplied, match="NaN or infinite.*data or VAE problem") as info:
        _accelerator(rt).backward(0.0)
    assert "install.py --check" not in str(info.value) and "open an issue" not in str(info.value)


def test_a_coarse_size_too_large_for_the_latent_stops_with_setting_advice():
    rt = Runtime()
    rt.configure(Settings(k=8, coarse=64), "torch")
    assert rt.select(torch.randn(2, 4, 8, 8), "p") is None and rt.stock_reasons == {"select:coarse": 1}
    with pytest.raises(SelectionNotApplied, match="immiscible_coarse.*Lower --immiscible_coarse") as info:
        _accelerator(rt).backward(0.0)
    assert "install.py --check" not in str(info.value)
