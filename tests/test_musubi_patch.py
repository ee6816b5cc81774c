"""What only the musubi-tuner adapter does, on the fake ``musubi_tuner`` of tests/helpers.py
(the shape of v0.3.4's patched functions).

What both adapters share (options, config file, k = 1 bit-identical, selection, fallback, the
first-step guard, metadata, trackers) is in tests/test_adapters.py. Here: the table, the shared
training loop's inline draw (model input and target use the selected tensor; other callers of
``torch.randn_like`` are untouched; unknown trainers on the loop are selected too), full
fine-tunes' inline draws and hv_train's own parser, a changed draw refused at start-up, the
architecture refusals (HiDream-O1, Qwen-Image layered, Self-Flow), ``python -m musubi_patch.run``
with a packaged script, and version names.
"""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest
import torch

import immiscible
from helpers import fake_host, selected_noise
from immiscible_host import adapter as adapter_module
from immiscible_host import options
from immiscible_host.points import point_for_script
from immiscible_host.ranks import seed_from_draw
from musubi_patch import host
from musubi_patch import run as musubi_run
from musubi_patch.host import ADAPTER

LOOP = "trainer_base.NetworkTrainer._run_training_loop (inline noise)"


@pytest.fixture
def mt(tmp_path, monkeypatch):
    """The fake musubi-tuner imported through musubi_patch's hook; the trainer is wan_train_network.py."""
    with fake_host("musubi-tuner", tmp_path, monkeypatch) as h:
        yield h


def test_table_derivations():
    assert ADAPTER.hook.targets == {"musubi_tuner.training.parser_common": "_add_training_args",
                                    "musubi_tuner.utils.sai_model_spec": "build_metadata",
                                    "musubi_tuner.hv_train": "setup_parser"}
    assert next(p for p in host.POINTS if p.name == host.HOST.always_intercept).attribute == \
        "NetworkTrainer._run_training_loop"
    assert len(host.LORA_TRAINERS) == 13
    assert all(point_for_script(host.POINTS, s).name == LOOP for s in host.LORA_TRAINERS)
    for script in ("hv_train.py", "qwen_image_train.py", "zimage_train.py", "hidream_o1_train.py"):
        assert point_for_script(host.POINTS, script).kind == "inline"


# --------------------------------------------------------------------------- the shared training loop


def test_the_shared_loop_selects_and_its_input_and_target_agree(mt):
    args = mt.parse("--immiscible_k", "8")
    batches = [mt.latents + i for i in range(2)]
    out = mt.loop(args, batches, seed=3)
    torch.manual_seed(3)  # the loop's stock draws, in order, each seeding its batch's selection
    for latents, noise, model_input, target in out:
        want = immiscible.select_noise(latents, 8, seed=seed_from_draw(torch.randn_like(latents)))
        assert torch.equal(noise, want)
        assert torch.equal(model_input, 0.75 * latents + 0.25 * noise) and torch.equal(target, noise - latents)
    assert mt.runtime.calls == 2 and mt.runtime.stock_batches == 0
    # another caller of torch.randn_like (sample generation, a dataset) is untouched
    torch.manual_seed(1)
    a = torch.randn_like(mt.latents)
    torch.manual_seed(1)
    assert torch.equal(a, torch.randn(mt.latents.shape))


def test_an_unknown_trainer_on_the_shared_loop_is_selected(mt):
    mt.adapter.script = "my_new_train_network.py"
    args = mt.parse("--immiscible_k", "8")
    seen, noise = mt.step(args)
    assert torch.equal(noise, selected_noise(seen, 8, seed=0)) and mt.runtime.calls == 1


def test_a_changed_shared_draw_is_refused_at_start_up(mt, capsys):
    drifted = mt.files["musubi_tuner/training/trainer_base.py"].replace("noise = torch.randn_like(latents)",
                                                                       "noise = torch.randn(latents.shape)")
    mt.build(files={"musubi_tuner/training/trainer_base.py": drifted})
    with pytest.raises(SystemExit) as exc:
        mt.parse("--immiscible_k", "8")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"patch point {LOOP} needed by wan_train_network.py" in err and "version" in err
    mt.parse()   # off: carries on


# --------------------------------------------------------------------------- full fine-tunes


def test_a_full_fine_tunes_inline_draw(mt):
    mt.adapter.script = "zimage_train.py"
    args = mt.parse("--immiscible_k", "4")
    torch.manual_seed(2)
    noise = mt.mods["zimage_train"].ZImageTrainer().train(args, mt.latents, mt.accelerator())
    assert torch.equal(noise, selected_noise(mt.latents, 4, seed=2))
    torch.manual_seed(2)
    other = mt.mods["hv_train"].FineTuningTrainer().train(args, mt.latents, mt.accelerator())
    torch.manual_seed(2)
    assert torch.equal(other, torch.randn(mt.latents.shape))  # another trainer's draw: not this run's point


def test_hv_train_has_its_own_parser_and_config_reader(mt, monkeypatch, tmp_path):
    hv = mt.mods["hv_train"]
    assert mt.runtime.points["hv_train.setup_parser"].ok and mt.runtime.points["hv_train.read_config_from_file"].ok
    mt.adapter.script = "hv_train.py"
    cfg = tmp_path / "hv.toml"
    cfg.write_text("immiscible_k = 4\n")
    monkeypatch.setattr(sys, "argv", ["hv_train.py", "--config_file", str(cfg), "--immiscible_metric", "cosine"])
    parser = hv.setup_parser()
    args = hv.read_config_from_file(parser.parse_args(), parser)
    assert mt.runtime.settings == options.Settings(k=4, metric="cosine")
    torch.manual_seed(7)
    noise = hv.FineTuningTrainer().train(args, mt.latents, mt.accelerator())
    assert torch.equal(noise, selected_noise(mt.latents, 4, seed=7, metric="cosine"))
    cfg.write_text("immiscible_k = 0\n")
    with pytest.raises(SystemExit):
        hv.read_config_from_file(parser.parse_args(), parser)


# --------------------------------------------------------------------------- architecture refusals


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


def test_an_architecture_refusal_stops_the_start_up(mt):
    args = mt.parse("--immiscible_k", "4")
    args.self_flow = True
    with pytest.raises(ValueError, match="--self_flow replaces process_batch"):
        mt.start_up_point(args)
    args.immiscible_k = 1
    mt.start_up_point(args)   # off: never refused


# --------------------------------------------------------------------------- python -m musubi_patch.run


PACKAGED_SCRIPT = '''
from musubi_tuner.training import parser_common

def main():
    parser = parser_common.setup_parser_common()
    global ARGS
    ARGS = parser_common.read_config_from_file(parser.parse_args(), parser)
'''


def test_a_packaged_script_runs_by_module_name(mt, monkeypatch, tmp_path):
    """src/musubi_tuner/X.py is imported as musubi_tuner.X and its main() called (as the root wrappers do)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "musubi_tuner" / "my_train.py"
    script.write_text(PACKAGED_SCRIPT)
    importlib.invalidate_caches()  # the package was imported before the file existed
    assert musubi_run.main([str(script), "--immiscible_k", "8"]) == 0
    module = sys.modules["musubi_tuner.my_train"]
    assert module.ARGS.immiscible_k == 8 and mt.runtime.settings.k == 8   # its parser got the options
    assert ADAPTER.script == "my_train.py" and sys.argv == [str(script), "--immiscible_k", "8"]
    other = tmp_path / "elsewhere" / "train_x.py"
    other.parent.mkdir()
    other.write_text("import musubi_tuner\nmusubi_tuner.RAN_AS = __name__\n")
    assert musubi_run.main([str(other)]) == 0
    assert sys.modules["musubi_tuner"].RAN_AS == "__main__" and sys.path[0] == str(other.parent)


# --------------------------------------------------------------------------- version


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
