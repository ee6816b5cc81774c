"""The kit's ``--immiscible_scope``: option, metadata, seeds, the start-up size check, and how the
run time treats a failed collective (stop) and a peer's failure (joint fallback, counted).

The real two-process behaviour is in ``test_scope_gloo.py`` and ``tests/integration/test_*two_rank*.py``.
"""
from __future__ import annotations

import argparse

import pytest
import torch

import immiscible
from immiscible_host import options, preflight, ranks, runtime as runtime_module
from immiscible_host.runtime import GroupSelectionFailed, Runtime

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def ns(**kw):
    return argparse.Namespace(**{**options.DEFAULTS, **kw})


def test_scope_option_follows_the_core_vocabulary_and_defaults_to_rank():
    p = argparse.ArgumentParser()
    options.add_immiscible_arguments(p, k_help="K")
    choices = {a.dest: a.choices for a in p._actions}
    assert choices["immiscible_scope"] == immiscible.SCOPES == ("rank", "global")
    assert options.settings_from_args(p.parse_args([])).scope == "rank"
    s = options.settings_from_args(p.parse_args(["--immiscible_k", "4", "--immiscible_scope", "global"]))
    assert s.scope == "global" and s.metadata()["ss_immiscible_scope"] == "global"
    with pytest.raises(SystemExit):
        p.parse_args(["--immiscible_scope", "world"])


def test_scope_from_a_config_file_is_checked_by_name():
    with pytest.raises(ValueError, match="immiscible_scope must be one of 'rank', 'global', got 'all'"):
        options.settings_from_args(ns(immiscible_scope="all"))


def test_global_scope_does_not_mix_the_rank_into_the_seed(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    stock = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seeds = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        seeds[rank, "rank"] = ranks.draw_rank_seed(stock, "rank").seed
        seeds[rank, "global"] = ranks.draw_rank_seed(stock, "global").seed
    assert seeds[0, "rank"] != seeds[1, "rank"]
    assert seeds[0, "global"] == seeds[1, "global"] == ranks.seed_from_draw(stock)


def test_process_group_is_none_without_a_distributed_run():
    assert ranks.process_group("rank") is None and ranks.process_group("global") is None


@pytest.mark.parametrize("scope,world,batch,k", [
    ("global", 64, 2, 4),     # 128^2 * 4 = 2^16: within
    ("global", 8, 512, 4),    # 4096^2 * 4 = 2^26: within
    ("global", 8, 1024, 4),   # 8192^2 * 4 = 2^28: refused
    ("global", 2, 4096, 2),   # 8192^2 * 2 = 2^27: within, the limit itself
    ("global", 2, 4097, 2),   # just above
    ("rank", 8, 1024, 4),     # one process's 1024^2 * 4 = 2^22: within
])
def test_start_up_checks_the_global_batch_against_the_limit(scope, world, batch, k):
    settings = options.Settings(k=k, mode="assign", scope=scope)
    solved = batch * world if scope == "global" else batch
    too_big = solved * solved * k > 2**27
    if not too_big:
        preflight.check_assign_size(settings, ns(train_batch_size=batch), world)
        return
    with pytest.raises(ValueError) as info:
        preflight.check_assign_size(settings, ns(train_batch_size=batch), world)
    msg = str(info.value)
    assert "--immiscible_scope global" in msg and f"{batch} per process x {world} processes" in msg
    assert f"global batch of {solved}" in msg and str(solved * solved * k) in msg and str(2**27) in msg
    assert "--immiscible_k" in msg


def test_start_up_size_check_needs_assign_and_a_known_batch():
    big = options.Settings(k=64, mode="knn", scope="global")
    preflight.check_assign_size(big, ns(train_batch_size=4096), 8)          # knn: no cost matrix
    preflight.check_assign_size(options.Settings(k=64, mode="assign", scope="global"), ns(), 8)  # batch unknown


@pytest.fixture
def global_runtime(monkeypatch):
    rt = Runtime()
    rt.configure(options.Settings(k=4, mode="assign", scope="global"), "torch")
    monkeypatch.setattr(runtime_module, "process_group", lambda scope: "GROUP" if scope == "global" else None)
    return rt


def test_a_failed_collective_stops_the_process_with_one_message(global_runtime, monkeypatch, caplog):
    def fail(*a, **kw):
        assert kw["group"] == "GROUP"
        raise immiscible.CollectiveError("the header collective ... failed on rank 1 (RuntimeError: gone)")

    monkeypatch.setattr(immiscible, "select_noise", fail)
    with pytest.raises(GroupSelectionFailed) as info:
        global_runtime.select(LATENTS, "point")
    msg = str(info.value)
    assert "--immiscible_scope global" in msg and "failed on rank 1" in msg and "--immiscible_scope rank" in msg
    assert global_runtime.stock_batches == 0   # not a fallback: the run stops
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == [msg]


def test_a_peer_failure_is_a_counted_fallback(global_runtime, monkeypatch):
    def peer(*a, **kw):
        raise immiscible.PeerSelectionError("rank(s) [1] of the group could not select this batch")

    monkeypatch.setattr(immiscible, "select_noise", peer)
    assert global_runtime.select(LATENTS, "point") is None
    assert global_runtime.stock_reasons == {"select:peer": 1}


def test_a_coarse_refusal_still_takes_part_in_the_group(monkeypatch):
    rt = Runtime()
    rt.configure(options.Settings(k=4, mode="assign", scope="global", coarse=64), "torch")
    monkeypatch.setattr(runtime_module, "process_group", lambda scope: "GROUP")
    parts = []
    monkeypatch.setattr(immiscible, "abstain", lambda group: parts.append(group))
    assert rt.select(LATENTS, "point") is None
    assert parts == ["GROUP"] and rt.stock_reasons == {"select:coarse": 1}
