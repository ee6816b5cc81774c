"""musubi_patch on a small fake of musubi-tuner (the shape of v0.3.4's patched functions).

- every parser built on ``setup_parser_common`` gets the options; ``--config_file`` values are
  checked (exit 2 naming the key and range);
- the shared loop's ``noise = torch.randn_like(latents)`` returns the selection, and the model
  input and target use that tensor; other callers of ``torch.randn_like`` are untouched;
- k = 1 or absent: noise and RNG state are bit-identical to stock;
- ``ss_immiscible_*`` metadata, not with ``--no_metadata``; full fine-tunes' inline draws;
- drift: a changed draw is refused at start-up; an unknown trainer stops at its first backward;
- the architecture refusals (HiDream-O1, Qwen-Image layered, Self-Flow).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest
import torch

import immiscible
from immiscible_host import adapter as adapter_module
from immiscible_host import options
from immiscible_host.points import point_for_script
from immiscible_host.runtime import SelectionNotApplied
from musubi_patch import host
from musubi_patch.host import ADAPTER

RUNTIME = ADAPTER.runtime

PARSER_COMMON = '''
import argparse, os, sys, tomllib

def _add_training_args(parser):
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--config_file", type=str, default=None)
    parser.add_argument("--no_metadata", action="store_true")

def setup_parser_common():
    parser = argparse.ArgumentParser()
    _add_training_args(parser)
    return parser

def read_config_from_file(args, parser):
    if not args.config_file:
        return args
    with open(args.config_file, "rb") as f:
        config = tomllib.load(f)
    flat = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return parser.parse_args(namespace=argparse.Namespace(**flat))
'''
TRAINER_BASE = '''
import torch

class NetworkTrainer:
    def scale_shift_latents(self, latents):
        return latents * 2.0

    def process_batch(self, args, latents, noise):
        t = 0.25
        return (1 - t) * latents + t * noise, noise - latents

    def _run_training_loop(self, args, batches, accelerator):
        out = []
        for latents in batches:
            latents = self.scale_shift_latents(latents)
            # Sample noise that we'll add to the latents
            noise = torch.randn_like(latents)
            model_input, target = self.process_batch(args, latents, noise)
            out.append((latents, noise, model_input, target))
            accelerator.backward(torch.zeros(()))
        return out
'''
SAI = '''
def build_metadata(state_dict, architecture, timestamp, title=None, is_lora=True):
    return {"modelspec.architecture": architecture}
'''
CONFIG_UTILS = '''
class BlueprintGenerator:
    def generate(self, user_config, argparse_namespace, **runtime_params):
        return "blueprint"
'''
ZIMAGE_TRAIN = '''
import torch

class ZImageTrainer:
    def train(self, args, latents, accelerator):
        noise = torch.randn_like(latents)
        accelerator.backward(torch.zeros(()))
        return noise
'''
ACCELERATE = '''
class Accelerator:
    def __init__(self):
        self.steps = 0
        self.trackers = []

    def backward(self, loss, **kw):
        self.steps += 1

    def init_trackers(self, name, config=None, init_kwargs=None):
        self.trackers = []
'''
LATENTS = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # [B, C, F, H, W]


def _purge():
    for name in [m for m in sys.modules if m.split(".")[0] in ("musubi_tuner", "accelerate")]:
        del sys.modules[name]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Build the fake musubi_tuner (``trainer_base`` may be replaced) and import it through the hook."""

    def build(trainer_base=TRAINER_BASE, script="wan_train_network.py"):
        pkg = tmp_path / "musubi_tuner"
        files = {"__init__.py": "", "training/__init__.py": "", "training/parser_common.py": PARSER_COMMON,
                 "training/trainer_base.py": trainer_base, "utils/__init__.py": "", "utils/sai_model_spec.py": SAI,
                 "dataset/__init__.py": "", "dataset/config_utils.py": CONFIG_UTILS, "zimage_train.py": ZIMAGE_TRAIN}
        for rel, text in files.items():
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            (pkg / rel).write_text(text)
        (tmp_path / "accelerate").mkdir(exist_ok=True)
        (tmp_path / "accelerate" / "__init__.py").write_text(ACCELERATE)
        _purge()
        importlib.invalidate_caches()
        monkeypatch.setattr(ADAPTER, "script", script)
        ADAPTER.hook.install()
        mods = {n: importlib.import_module("musubi_tuner." + n) for n in
                ("training.parser_common", "training.trainer_base", "utils.sai_model_spec", "dataset.config_utils",
                 "zimage_train")}
        return mods, importlib.import_module("accelerate")

    saved = {m: sys.modules[m] for m in list(sys.modules) if m.split(".")[0] in ("musubi_tuner", "accelerate")}
    monkeypatch.syspath_prepend(str(tmp_path))
    RUNTIME.reset()
    RUNTIME.points.clear()
    randn_like = torch.randn_like
    try:
        yield build
    finally:
        ADAPTER.hook.uninstall()
        RUNTIME.reset()
        RUNTIME.points.clear()
        torch.randn_like = randn_like
        from immiscible_host import randn_like as rl

        rl._functions.clear()
        _purge()
        sys.modules.update(saved)


def _args(mods, monkeypatch, *argv):
    """Parse like a musubi script's main(): setup_parser_common, parse_args, read_config_from_file."""
    pc = mods["training.parser_common"]
    monkeypatch.setattr(sys, "argv", ["wan_train_network.py", *argv])
    parser = pc.setup_parser_common()
    return pc.read_config_from_file(parser.parse_args(), parser)


def _loop(mods, accelerate, args, n=2):
    trainer = mods["training.trainer_base"].NetworkTrainer()
    mods["dataset.config_utils"].BlueprintGenerator().generate({}, args)
    return trainer._run_training_loop(args, [LATENTS + i for i in range(n)], accelerate.Accelerator())


def test_table_derivations():
    assert ADAPTER.hook.targets == {"musubi_tuner.training.parser_common": "_add_training_args",
                                   "musubi_tuner.utils.sai_model_spec": "build_metadata",
                                   "musubi_tuner.hv_train": "setup_parser"}
    assert next(p for p in host.POINTS if p.name == host.HOST.always_intercept).attribute == "NetworkTrainer._run_training_loop"
    assert len(host.LORA_TRAINERS) == 13
    for script in ("hv_train.py", "qwen_image_train.py", "zimage_train.py", "hidream_o1_train.py"):
        assert point_for_script(host.POINTS, script).kind == "inline"


def test_options_and_config_checks(fake, monkeypatch, tmp_path):
    mods, _ = fake()
    args = _args(mods, monkeypatch, "--immiscible_k", "8", "--immiscible_metric", "cosine")
    assert (args.immiscible_k, args.immiscible_metric, RUNTIME.settings.k) == (8, "cosine", 8)
    assert not hasattr(args, "immiscible_validation")        # musubi has no validation passes
    cfg = tmp_path / "c.toml"
    cfg.write_text('[immiscible]\nimmiscible_k = 6\nimmiscible_mode = "assign"\n')
    args = _args(mods, monkeypatch, "--config_file", str(cfg), "--immiscible_metric", "cosine")
    assert (RUNTIME.settings.k, RUNTIME.settings.mode, RUNTIME.settings.metric) == (6, "assign", "cosine")
    for bad in ('"64"', "64.5", "0", "-3"):
        cfg.write_text(f"immiscible_k = {bad}\n")
        RUNTIME.reset()
        with pytest.raises(SystemExit) as exc:
            _args(mods, monkeypatch, "--config_file", str(cfg))
        assert exc.value.code == 2


def test_bad_config_message_names_key_and_range(fake, monkeypatch, tmp_path, capsys):
    mods, _ = fake()
    cfg = tmp_path / "c.toml"
    cfg.write_text('immiscible_k = "64"\n')
    with pytest.raises(SystemExit):
        _args(mods, monkeypatch, "--config_file", str(cfg))
    err = capsys.readouterr().err
    assert "immiscible_k must be an integer in [1, 65536]" in err and str(cfg) in err


def test_shared_loop_selects_and_input_target_agree(fake, monkeypatch):
    mods, accelerate = fake()
    args = _args(mods, monkeypatch, "--immiscible_k", "8")
    torch.manual_seed(3)
    out = _loop(mods, accelerate, args)
    torch.manual_seed(3)
    for latents, noise, model_input, target in out:
        want = immiscible.select_noise(latents, 8, seed=immiscible.draw_seed())
        assert torch.equal(noise, want)
        assert torch.equal(model_input, 0.75 * latents + 0.25 * noise) and torch.equal(target, noise - latents)
    assert RUNTIME.calls == 2 and RUNTIME.stock_batches == 0
    # another caller of torch.randn_like (sample generation, a dataset) is untouched
    torch.manual_seed(1)
    a = torch.randn_like(LATENTS)
    torch.manual_seed(1)
    assert torch.equal(a, torch.randn(LATENTS.shape))


@pytest.mark.parametrize("argv", [(), ("--immiscible_k", "1")])
def test_off_is_bit_identical(fake, monkeypatch, argv):
    mods, accelerate = fake()
    args = _args(mods, monkeypatch, *argv)
    torch.manual_seed(3)
    out = _loop(mods, accelerate, args)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    for latents, noise, _, _ in out:
        assert torch.equal(noise, torch.randn_like(latents))
    assert torch.equal(state, torch.get_rng_state()) and RUNTIME.calls == 0


def test_metadata(fake, monkeypatch):
    mods, _ = fake()
    sai = mods["utils.sai_model_spec"]
    _args(mods, monkeypatch)
    assert sai.build_metadata(None, "wan", 0.0) == {"modelspec.architecture": "wan"}
    _args(mods, monkeypatch, "--immiscible_k", "8")
    md = sai.build_metadata(None, "wan", 0.0)
    assert md["ss_immiscible_k"] == "8" and md["ss_immiscible_mode"] == "knn" and md["ss_immiscible_stock_batches"] == "0"
    _args(mods, monkeypatch, "--immiscible_k", "8", "--no_metadata")
    assert "ss_immiscible_k" not in sai.build_metadata(None, "wan", 0.0)


def test_full_fine_tune_inline_draw(fake, monkeypatch):
    mods, accelerate = fake(script="zimage_train.py")
    args = _args(mods, monkeypatch, "--immiscible_k", "4")
    torch.manual_seed(2)
    noise = mods["zimage_train"].ZImageTrainer().train(args, LATENTS, accelerate.Accelerator())
    torch.manual_seed(2)
    assert torch.equal(noise, immiscible.select_noise(LATENTS, 4, seed=immiscible.draw_seed()))


def test_changed_draw_is_refused_at_start_up(fake, monkeypatch, capsys):
    drifted = TRAINER_BASE.replace("noise = torch.randn_like(latents)", "noise = torch.randn(latents.shape)")
    mods, _ = fake(drifted)
    with pytest.raises(SystemExit) as exc:
        _args(mods, monkeypatch, "--immiscible_k", "8")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trainer_base.NetworkTrainer._run_training_loop" in err and "version" in err
    _args(mods, monkeypatch)   # off: carries on


def test_unknown_trainer_stops_before_its_first_step(fake, monkeypatch):
    mods, accelerate = fake(script="my_new_train.py")
    args = _args(mods, monkeypatch, "--immiscible_k", "8")
    acc = accelerate.Accelerator()
    torch.randn(3)                      # draws noise some way the pack does not see
    with pytest.raises(SelectionNotApplied, match="my_new_train.py"):
        acc.backward(torch.zeros(()))
    assert acc.steps == 0 and args.immiscible_k == 8


def test_unknown_trainer_on_the_shared_loop_is_selected(fake, monkeypatch):
    mods, accelerate = fake(script="my_new_train_network.py")
    args = _args(mods, monkeypatch, "--immiscible_k", "8")
    _loop(mods, accelerate, args)
    assert RUNTIME.calls == 2


def _ns(**kw):
    return argparse.Namespace(**kw)


def test_architecture_refusals():
    on, cos = options.Settings(k=4), options.Settings(k=4, metric="cosine")
    hidream = dict(noise_scale_start=None, noise_scale_end=None)
    with pytest.raises(ValueError, match="noise_clip_std"):
        host.check_architecture(_ns(model_type="dev", noise_clip_std=None, **hidream), cos)
    with pytest.raises(ValueError, match="--immiscible_metric cosine"):
        host.check_architecture(_ns(model_type="full", noise_clip_std=None, **hidream), on)
    host.check_architecture(_ns(model_type="full", noise_clip_std=None, **hidream), cos)
    host.check_architecture(_ns(model_type="dev", noise_clip_std=0.0, **hidream), cos)
    with pytest.raises(ValueError, match="remove_first_image_from_target"):
        host.check_architecture(_ns(remove_first_image_from_target=True), on)
    with pytest.raises(ValueError, match="--self_flow"):
        host.check_architecture(_ns(self_flow=True), on)
    for args in (_ns(remove_first_image_from_target=True), _ns(self_flow=True), _ns(model_type="dev",
                 noise_clip_std=None, **hidream)):
        host.check_architecture(args, options.Settings(k=1))   # off: never refused
    # cosine is scale-free: HiDream-O1's noise_scale does not change the choice
    x = torch.randn(2, 64)
    cands = torch.randn(8, 2, 64)
    assert torch.equal(torch.nn.functional.cosine_similarity(cands, x, dim=-1).argmax(0),
                       torch.nn.functional.cosine_similarity(8.0 * cands, x, dim=-1).argmax(0))


def test_version_of_a_tree_names_its_pyproject_version_and_a_known_fingerprint(tmp_path):

    root = tmp_path / "musubi"
    (root / "src/musubi_tuner").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "musubi-tuner"\nversion = "9.9.9"\n')
    for rel in host.HOST.version_files[1]:
        (root / "src/musubi_tuner" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "src/musubi_tuner" / rel).write_text(f"# {rel}\n")
    assert host.HOST.describe(root) == "9.9.9 (not a git checkout; its patched files match no tested version)"
    fp = host.HOST.fingerprint(root)
    host.KNOWN[fp] = "v9.9.9 (test)"
    adapter_module._describe.cache_clear()
    try:
        assert host.HOST.describe(root) == "9.9.9, identified as v9.9.9 (test) by its patched files (not a git checkout)"
    finally:
        del host.KNOWN[fp]
        adapter_module._describe.cache_clear()
