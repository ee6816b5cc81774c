"""immiscible_host.points and .patching: a table of patch points and what is derived from it."""
from __future__ import annotations

import types

import pytest

from immiscible_host import patching
from immiscible_host.points import (FLOW_NOISE, GUARD, INLINE, OPTIONS, SD_NOISE, START_UP, TRACKERS, PatchPoint,
                                    hook_targets, inspect_point, inspect_sources, needed_points, point_for_script,
                                    point_of_kind, points_patched_with)


def tag_wrapper(point, original):
    def wrapper(*a, **kw):
        return ("wrapped", point.name, original(*a, **kw))

    return patching.mark(wrapper, original)


TABLE = (
    PatchPoint("host.parser", "pkg.util", "add_args", OPTIONS, params=("parser",), identifies=True),
    PatchPoint("host.noise", "pkg.util", "make_noise", SD_NOISE, params=("latents",), needle="randn_like(latents",
               scripts=("train.py", "train_xl.py")),
    PatchPoint("host.flow", "pkg.flow", "noisy_input", FLOW_NOISE, params=("latents", "noise"), scripts=("flow.py",),
               identifies=True),
    PatchPoint("host.inline", "train_cn", "train", INLINE, needle="randn_like(latents", scripts=("train_cn.py",),
               aliases=("train_old_cn",)),
    PatchPoint("lib.Tracker.start", "somelib", "Tracker.start", TRACKERS, patched_with="pkg.util", in_host=False),
)


def test_point_rows_are_checked():
    with pytest.raises(ValueError, match="kind"):
        PatchPoint("x", "m", "f", "noise")
    with pytest.raises(ValueError, match="namespace parameter"):
        PatchPoint("x", "m", "f", START_UP)


def test_roles_are_named_in_the_table_not_found_by_position():
    guard = PatchPoint("lib.step", "somelib", "Step.backward", GUARD, in_host=False)
    assert point_of_kind((*TABLE, guard), GUARD) is guard
    with pytest.raises(ValueError, match="exactly one guard point, found 0"):
        point_of_kind(TABLE, GUARD)
    with pytest.raises(ValueError, match="found 2"):
        point_of_kind((guard, *TABLE, guard), GUARD)


def test_a_checkout_needs_its_trainers_points_and_the_shared_support_points():
    own = PatchPoint("host.xl_parser", "pkg.xl", "setup", OPTIONS, scripts=("train_xl.py",))
    table = (*TABLE, own)
    assert needed_points(table, ["train.py"]) == {"host.parser", "host.noise", "lib.Tracker.start"}
    assert needed_points(table, ["train_xl.py"]) >= {"host.xl_parser", "host.noise"}
    assert "host.xl_parser" not in needed_points(table, ["flow.py"])
    assert point_for_script(table, "train_xl.py").name == "host.noise"   # a support point is never a trainer's draw


def test_everything_is_derived_from_the_table():
    assert hook_targets(TABLE) == {"pkg.util": "add_args", "pkg.flow": "noisy_input"}
    assert [p.name for p in points_patched_with(TABLE, "pkg.util")] == ["host.parser", "host.noise",
                                                                        "lib.Tracker.start"]
    assert point_for_script(TABLE, "train_xl.py").name == "host.noise"
    assert point_for_script(TABLE, "train_cn.py").kind == INLINE and point_for_script(TABLE, "other.py") is None
    assert TABLE[3].files == ("train_cn.py", "train_old_cn.py") and TABLE[4].files == ()
    with pytest.raises(ValueError, match="no identifying point for pkg.util"):
        hook_targets(TABLE[1:])


def write_host(root, util=None, flow=True, inline_name="train_cn.py"):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "util.py").write_text(util if util is not None else
                                          "def add_args(parser): pass\n"
                                          "def make_noise(args, latents):\n    n = torch.randn_like(latents)\n")
    if flow:
        (root / "pkg" / "flow.py").write_text("def noisy_input(latents, noise, t): pass\n")
    if inline_name:
        (root / inline_name).write_text("def train(args):\n    x = 1\n    noise = torch.randn_like(latents)\n")
    return root


def test_static_inspection_ok_absent_broken(tmp_path):
    rows = {p.name: s for p, s in inspect_sources(write_host(tmp_path / "a"), TABLE)}
    assert "lib.Tracker.start" not in rows  # not in the host's tree
    assert all(s.ok for s in rows.values()) and rows["host.noise"].detail == "pkg/util.py:2"
    rows = {p.name: s for p, s in inspect_sources(write_host(tmp_path / "b", flow=False, inline_name=None), TABLE)}
    assert rows["host.flow"].state == "absent" and "pkg/flow.py not in this version" in rows["host.flow"].detail
    assert rows["host.inline"].state == "absent"
    rows = {p.name: s for p, s in inspect_sources(write_host(tmp_path / "c", inline_name="train_old_cn.py"), TABLE)}
    assert rows["host.inline"].ok and rows["host.inline"].detail == "train_old_cn.py:1"
    util = "def add_args(p): pass\ndef make_noise(args, latents):\n    n = torch.randn(latents.shape)\n"
    rows = {p.name: s for p, s in inspect_sources(write_host(tmp_path / "d", util=util), TABLE)}
    assert rows["host.parser"].state == "broken" and "['parser'] missing" in rows["host.parser"].detail
    assert rows["host.noise"].state == "broken" and "randn_like(latents" in rows["host.noise"].detail
    (tmp_path / "e" / "pkg").mkdir(parents=True)
    (tmp_path / "e" / "pkg" / "util.py").write_text("def (:\n")
    assert inspect_point(tmp_path / "e", TABLE[0]).state == "broken"
    assert str(inspect_point(tmp_path / "e", TABLE[2])) == "absent (pkg/flow.py not in this version)"


def test_dotted_attributes_are_found_in_classes(tmp_path):
    (tmp_path / "m.py").write_text("class A:\n    def go(self, latents): pass\n")
    point = PatchPoint("m.A.go", "m", "A.go", OPTIONS, params=("latents",))
    assert inspect_point(tmp_path, point).detail == "m.py:2"


def fake_module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def test_patch_module_wraps_checks_and_records(monkeypatch):
    def make_noise(args, latents):
        return torch.randn_like(latents)  # noqa: F821 - never called; its source is read

    util = fake_module("pkg.util", add_args=lambda parser: "parsed", make_noise=make_noise)
    tracker = type("Tracker", (), {"start": lambda self: "started"})
    monkeypatch.setitem(__import__("sys").modules, "somelib", fake_module("somelib", Tracker=tracker))
    statuses = {}
    patching.patch_module(util, TABLE, statuses, tag_wrapper)
    assert set(statuses) == {"host.parser", "host.noise", "lib.Tracker.start"}
    assert all(s.ok for s in statuses.values()), statuses
    assert util.add_args(None) == ("wrapped", "host.parser", "parsed")
    assert tracker().start() == ("wrapped", "lib.Tracker.start", "started")
    wrapped = util.add_args
    patching.patch_module(util, TABLE, statuses, tag_wrapper)  # idempotent
    assert util.add_args is wrapped


def test_patch_module_leaves_a_broken_point_alone_and_never_raises(monkeypatch):
    def make_noise(args, latents):
        return None  # no base draw

    util = fake_module("pkg.util", add_args=lambda p: 1, make_noise=make_noise)
    monkeypatch.setitem(__import__("sys").modules, "somelib", None)  # import fails
    statuses = {}
    patching.patch_module(util, TABLE, statuses, tag_wrapper)
    assert statuses["host.noise"].state == "broken" and util.make_noise is make_noise
    assert statuses["host.parser"].state == "broken" and "['parser']" in statuses["host.parser"].detail
    assert statuses["lib.Tracker.start"].state == "broken" and "not importable" in statuses["lib.Tracker.start"].detail
    flow = fake_module("pkg.flow")
    patching.patch_module(flow, TABLE, statuses, tag_wrapper)
    assert statuses["host.flow"].detail == "pkg.flow.noisy_input not found"
