"""immiscible_host.randn_like: the host's own torch.randn_like(latents) returns the selection."""
from __future__ import annotations

import threading

import pytest
import torch

from immiscible_host import randn_like
from immiscible_host.options import Settings
from immiscible_host.runtime import Runtime

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture
def rt():
    saved = torch.randn_like
    r = Runtime()
    r.configure(Settings(k=8))
    yield r
    torch.randn_like = saved
    randn_like._functions.clear()


def test_only_the_first_draw_on_those_latents_is_selected(rt):
    saved = torch.randn_like
    other = torch.zeros(3)
    with randn_like.SelectFirstRandnLike(LATENTS, "p", rt) as slot:
        assert torch.randn_like is not saved
        torch.manual_seed(0)
        a = torch.randn_like(other)  # another tensor: stock
        first = torch.randn_like(LATENTS, device=LATENTS.device)
        second = torch.randn_like(LATENTS)
    assert torch.randn_like is saved and slot.fired
    torch.manual_seed(0)
    torch.randn_like(other)
    stock_first = torch.randn_like(LATENTS)
    want = rt.select(LATENTS, "ref", stock=stock_first)   # seeded from the host's own draw
    stock_second = torch.randn_like(LATENTS)
    assert a.shape == other.shape and torch.equal(first, want) and not torch.equal(first, stock_first)
    assert torch.equal(second, stock_second)   # the host's stream is stock's: the second draw is its own


def test_selecting_leaves_the_hosts_random_stream_where_stock_leaves_it(rt):
    """Common random numbers: with selection on, every later draw equals a k = 1 run's."""
    torch.manual_seed(7)
    with randn_like.SelectFirstRandnLike(LATENTS, "p", rt) as slot:
        torch.randn_like(LATENTS)
    after_selected = torch.randint(0, 1000, (8,))
    torch.manual_seed(7)
    torch.randn_like(LATENTS)
    assert slot.fired and rt.calls == 1 and torch.equal(after_selected, torch.randint(0, 1000, (8,)))


def test_unsupported_arguments_fall_back_and_count(rt):
    with randn_like.SelectFirstRandnLike(LATENTS, "p", rt) as slot:
        torch.manual_seed(0)
        got = torch.randn_like(LATENTS, memory_format=torch.contiguous_format)
    torch.manual_seed(0)
    assert slot.fired and torch.equal(got, torch.randn_like(LATENTS))
    assert rt.stock_batches == 1 and rt.stock_reasons == {"randn_like-args:p": 1}


def test_other_threads_pass_through(rt):
    out = {}

    def worker():
        torch.manual_seed(1)
        out["thread"] = torch.randn_like(LATENTS)

    with randn_like.SelectFirstRandnLike(LATENTS, "p", rt) as slot:
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert not slot.fired
    torch.manual_seed(1)
    assert torch.equal(out["thread"], torch.randn_like(LATENTS))


def test_intercept_in_function_matches_file_and_function(rt, tmp_path):
    src = "import torch\ndef train(x):\n    return torch.randn_like(x)\ndef helper(x):\n    return torch.randn_like(x)\n"
    ns_new, ns_old, ns_other = {}, {}, {}
    exec(compile(src, str(tmp_path / "train_cn.py"), "exec"), ns_new)
    exec(compile(src, str(tmp_path / "train_old_cn.py"), "exec"), ns_old)
    exec(compile(src, str(tmp_path / "unrelated.py"), "exec"), ns_other)
    randn_like.intercept_in_function(("train_cn.py", "train_old_cn.py"), "train", "inline", rt)
    randn_like.intercept_in_function(("train_cn.py", "train_old_cn.py"), "train", "inline", rt)  # idempotent
    assert torch.randn_like.__immiscible_next__ is not torch.randn_like
    results = {}
    for name, fn in (("new", ns_new["train"]), ("old", ns_old["train"]), ("helper", ns_new["helper"]),
                     ("other", ns_other["train"])):
        torch.manual_seed(4)
        results[name] = fn(LATENTS)
    torch.manual_seed(4)
    stock = torch.randn_like.__immiscible_next__(LATENTS)
    want = rt.select(LATENTS, "ref", stock=stock)
    assert torch.equal(results["new"], want) and torch.equal(results["old"], want)
    assert torch.equal(results["helper"], stock) and torch.equal(results["other"], stock)
