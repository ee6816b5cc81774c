"""Integration tests against a real kohya-ss/musubi-tuner checkout (``MUSUBI_DIR``).

pytest may run in any environment; every check runs this same file as a script in the musubi-tuner
venv (``MUSUBI_VENV``, default: the interpreter running pytest) with the checkout as working
directory and the test-only CPU shim (scripts/fixtures/musubi_cpu_shim) on ``PYTHONPATH``.
Skipped with a reason when ``MUSUBI_DIR`` is unset.

    MUSUBI_DIR=/work/ext/musubi/musubi-tuner MUSUBI_VENV=/work/ext/musubi/venv \
        .venv/bin/python -m pytest tests/integration/test_musubi.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[2]
FIXTURES = PACK / "scripts" / "fixtures"
MUSUBI_DIR = os.environ.get("MUSUBI_DIR")
TRAINERS = ("hv_train_network", "hv_1_5_train_network", "wan_train_network", "fpack_train_network",
            "flux_kontext_train_network", "flux_2_train_network", "flux_2_train_network_self_flow",
            "qwen_image_train_network", "kandinsky5_train_network", "krea2_train_network", "zimage_train_network",
            "ideogram4_train_network", "hidream_o1_train_network", "hv_train", "qwen_image_train", "zimage_train",
            "hidream_o1_train")


def _venv_python() -> str:
    venv = os.environ.get("MUSUBI_VENV")
    return str(Path(venv) / "bin" / "python") if venv else sys.executable


def _case(name: str, *args: str, timeout: int = 900) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FIXTURES / "musubi_cpu_shim"), str(FIXTURES), str(PACK),
                                         env.get("PYTHONPATH", "")])
    env.pop("IMMISCIBLE_MUSUBI_DISABLE", None)
    res = subprocess.run([_venv_python(), __file__, name, *args], cwd=MUSUBI_DIR, env=env, capture_output=True,
                         text=True, timeout=timeout)
    out = [line for line in res.stdout.splitlines() if line.startswith("@@")]
    assert res.returncode == 0 and out, f"case {name} failed (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return json.loads(out[-1][2:])


# =========================================================================== pytest side

if __name__ != "__main__":
    import pytest

    pytestmark = pytest.mark.skipif(not MUSUBI_DIR, reason="MUSUBI_DIR (a kohya-ss/musubi-tuner checkout) is not set")

    def test_every_trainer_offers_the_options():
        res = _case("parsers")
        assert sorted(res) == sorted(TRAINERS)
        for script, opts in res.items():
            assert opts == ["--immiscible_backend", "--immiscible_coarse", "--immiscible_k", "--immiscible_metric",
                            "--immiscible_mode", "--immiscible_scope"], script

    def test_config_file_and_bad_values():
        res = _case("config", str(PACK / "configs"))
        assert res["good"] == {"k": 8, "mode": "knn", "metric": "cosine", "coarse": 4}
        for bad, (rc, msg) in res["bad"].items():
            assert rc == 2 and "immiscible_k" in msg and "[1, 65536]" in msg, (bad, msg)
        assert res["wan21_config"]["k"] == 4 and res["wan21_config"]["unknown_keys"] == []
        assert res["dataset_ok"]

    def test_special_architectures_refuse_or_accept():
        res = _case("refusals")
        assert res["hidream_dev_default_clip"][0] == 2 and "noise_clip_std" in res["hidream_dev_default_clip"][1]
        assert res["hidream_l2"][0] == 2 and "--immiscible_metric cosine" in res["hidream_l2"][1]
        assert res["hidream_cosine_noclip"][0] == 0
        assert res["qwen_remove_first"][0] == 2 and "remove_first_image_from_target" in res["qwen_remove_first"][1]
        assert res["qwen_layered_plain"][0] == 0
        assert res["self_flow"][0] == 2 and "--self_flow" in res["self_flow"][1]
        assert res["hidream_full_ft_l2"][0] == 2

    def test_wan22_high_low_uses_the_selected_noise():
        res = _case("wan22")
        assert res["consistent"] and res["per_sample_timesteps"] == 2

    def test_real_training_loop_selects_and_off_is_bit_identical(tmp_path):
        res = _case("loop", str(tmp_path))
        k8 = res["k8"]
        assert k8["steps"] == 2 and all(k8["noise_is_selection"]) and all(k8["target_is_noise_minus_latents"])
        assert all(k8["input_is_mix"])
        assert k8["metadata"]["ss_immiscible_k"] == "8"
        assert res["k1_equals_stock"] and res["off_equals_stock"] and not res["k8_equals_stock"]
        assert res["k1_noise_equals_stock"]

    def test_drifted_draw_stops_before_the_first_step(tmp_path):
        res = _case("drift", str(tmp_path))
        assert res["rc"] != 0 and "trainer_base.NetworkTrainer._run_training_loop" in res["msg"]
        assert "version" in res["msg"]


# =========================================================================== venv side (script)


def _emit(obj) -> None:
    print("@@" + json.dumps(obj), flush=True)


def _setup():
    import logging

    logging.basicConfig(level=logging.WARNING)
    from musubi_patch.host import ADAPTER

    ADAPTER.hook.install()
    sys.path.insert(0, os.path.join(os.getcwd(), "src"))


def case_parsers():
    import contextlib
    import importlib
    import io

    _setup()
    out = {}
    for name in TRAINERS:
        module = importlib.import_module("musubi_tuner." + name)
        sys.argv = [name + ".py", "--help"]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            module.main()
        out[name] = sorted({w.strip("[],") for w in buf.getvalue().split() if w.startswith("--immiscible_")})
    _emit(out)


def _parse(module_name, argv, setup="setup"):
    """(exit code, message) of a real parser + read_config_from_file + start-up on ``argv``."""
    import contextlib
    import importlib
    import io

    from musubi_patch.host import ADAPTER; RUNTIME = ADAPTER.runtime

    RUNTIME.reset()
    module = importlib.import_module("musubi_tuner." + module_name)
    import musubi_tuner.training.parser_common as pc

    if module_name == "hv_train":
        parser = module.setup_parser()
        read = module.read_config_from_file
    else:
        parser = pc.setup_parser_common()
        if module_name.endswith("_train"):   # a full fine-tune: the LoRA script's options, then its own
            network = importlib.import_module(f"musubi_tuner.{module_name}_network")
            parser = next(getattr(network, n) for n in dir(network) if n.endswith("_setup_parser")
                          and getattr(getattr(network, n), "__module__", "") == network.__name__)(parser)
        for n in dir(module):
            fn = getattr(module, n)
            if n.endswith("_setup_parser") and callable(fn) and getattr(fn, "__module__", "") == module.__name__:
                parser = fn(parser)
        read = pc.read_config_from_file
    err = io.StringIO()
    sys.argv = [module_name + ".py", *argv]   # musubi's read_config_from_file re-parses sys.argv
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args()
            args = read(args, parser)
        return 0, "", args
    except SystemExit as exc:
        return int(exc.code or 0), err.getvalue().strip().splitlines()[-1], None


def case_config(configs):
    import tempfile

    _setup()
    from musubi_patch.host import ADAPTER; RUNTIME = ADAPTER.runtime

    base = ["--dit", "x", "--dataset_config", "d.toml", "--task", "t2v-1.3B"]
    tmp = tempfile.mkdtemp()

    def toml(body):
        path = os.path.join(tmp, f"c{abs(hash(body))}.toml")
        open(path, "w").write(body)
        return path

    config = toml("[immiscible]\nimmiscible_k = 8\nimmiscible_coarse = 4\n")
    rc, msg, args = _parse("wan_train_network", base + ["--config_file", config,
                                                        "--immiscible_metric", "cosine"])
    s = RUNTIME.settings
    good = {"k": s.k, "mode": s.mode, "metric": s.metric, "coarse": s.coarse}
    bad = {}
    for value in ('"64"', "64.5", "0", "-3", "70000"):
        rc, msg, _ = _parse("wan_train_network", base + ["--config_file", toml(f"immiscible_k = {value}\n")])
        bad[value] = (rc, msg)
    # the shipped config: every key is a real option of wan_train_network's parser
    import toml as tomllib

    import musubi_tuner.training.parser_common as pc
    import musubi_tuner.wan_train_network as wan

    parser = wan.wan_setup_parser(pc.setup_parser_common())
    dests = {a.dest for a in parser._actions}
    cfg = tomllib.load(os.path.join(configs, "wan21_lora.toml"))
    keys = [k for section in cfg.values() for k in (section if isinstance(section, dict) else {})]
    rc, msg, args = _parse("wan_train_network", ["--dataset_config", os.path.join(configs, "dataset_wan21.toml"),
                                                 "--config_file", os.path.join(configs, "wan21_lora.toml")])
    from musubi_tuner.dataset.config_utils import ConfigSanitizer, load_user_config

    ConfigSanitizer().sanitize_user_config(load_user_config(os.path.join(configs, "dataset_wan21.toml")))
    _emit({"good": good, "bad": bad, "dataset_ok": True,
           "wan21_config": {"k": RUNTIME.settings.k, "rc": rc, "unknown_keys": [k for k in keys if k not in dests]}})


def case_refusals():
    _setup()
    out = {}
    hd = ["--dit", "x", "--dataset_config", "d.toml", "--immiscible_k", "4"]
    out["hidream_dev_default_clip"] = _parse("hidream_o1_train_network", hd + ["--model_type", "dev",
                                                                               "--immiscible_metric", "cosine"])[:2]
    out["hidream_l2"] = _parse("hidream_o1_train_network", hd)[:2]
    out["hidream_cosine_noclip"] = _parse("hidream_o1_train_network", hd + ["--immiscible_metric", "cosine"])[:2]
    out["hidream_full_ft_l2"] = _parse("hidream_o1_train", hd)[:2]
    q = ["--dit", "x", "--dataset_config", "d.toml", "--immiscible_k", "4", "--model_version", "layered"]
    out["qwen_remove_first"] = _parse("qwen_image_train_network", q + ["--remove_first_image_from_target"])[:2]
    out["qwen_layered_plain"] = _parse("qwen_image_train_network", q)[:2]
    out["self_flow"] = _parse("flux_2_train_network_self_flow", ["--dit", "x", "--dataset_config", "d.toml",
                                                                 "--immiscible_k", "4", "--self_flow"])[:2]
    _emit(out)


def case_wan22():
    import torch

    _setup()
    import immiscible
    import musubi_tuner.training.parser_common as pc
    import musubi_tuner.wan_train_network as wan

    parser = wan.wan_setup_parser(pc.setup_parser_common())
    args = parser.parse_args(["--dit", "x", "--dataset_config", "d.toml", "--task", "t2v-A14B",
                              "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0"])
    trainer = wan.WanNetworkTrainer()
    trainer.high_low_training, trainer.timestep_boundary, trainer.num_timestep_buckets = True, 0.875, None
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 3, 8, 8)
    noise = immiscible.select_noise(latents, 8, seed=1)
    noisy, ts = trainer.get_noisy_model_input_and_timesteps(args, noise, latents, None, None, "cpu", torch.float32)
    t = ((ts.float() - 1.0) / 1000.0).view(-1, 1, 1, 1, 1)  # timesteps are t * 1000 + 1
    _emit({"consistent": bool(torch.allclose(noisy, (1 - t) * latents + t * noise, atol=1e-5)),
           "per_sample_timesteps": int(ts.numel())})


def _train(fixture, out, extra, record=None, k_for_check=None, env=None):
    """One tiny Wan LoRA run of the real wan_train_network.main() in this process' child."""
    script = f"""
import json, os, sys, runpy
sys.path.insert(0, {str(FIXTURES)!r}); sys.path.insert(0, {str(PACK)!r})
import musubi_tiny_wan; musubi_tiny_wan.register()
from musubi_patch.host import ADAPTER; ADAPTER.hook.install()
import torch, immiscible
import musubi_tuner.training.trainer_base as tb
import musubi_tuner.wan_train_network as wan
rows = []
orig_pb, orig_dit = tb.NetworkTrainer.process_batch, wan.WanNetworkTrainer.call_dit
def process_batch(self, args, accelerator, transformer, network, batch, latents, noise, *a, **kw):
    rows.append({{"noise": noise.clone(), "latents": latents.clone()}})
    return orig_pb(self, args, accelerator, transformer, network, batch, latents, noise, *a, **kw)
def call_dit(self, args, accelerator, transformer, latents, batch, noise, noisy, timesteps, *a, **kw):
    out = orig_dit(self, args, accelerator, transformer, latents, batch, noise, noisy, timesteps, *a, **kw)
    t = ((timesteps.float() - 1.0) / 1000.0).view(-1, *([1] * (latents.ndim - 1)))
    rows[-1]["target_ok"] = bool(torch.equal(out.target.float(), noise.float() - latents.float()))  # call_dit casts latents first
    rows[-1]["input_ok"] = bool(torch.allclose(noisy.float(), ((1 - t) * latents + t * noise).float(), atol=1e-4))
    return out
tb.NetworkTrainer.process_batch, wan.WanNetworkTrainer.call_dit = process_batch, call_dit
sys.argv = ["wan_train_network.py"] + json.loads(sys.argv[1])
try:
    wan.main()
finally:
    dump = os.environ.get("IMMISCIBLE_MUSUBI_DUMP")
    sel = [json.loads(l) for l in open(os.path.join(dump, "rank0.jsonl"))] if dump and os.path.exists(os.path.join(dump, "rank0.jsonl")) else []
    res = {{"steps": len(rows), "target_is_noise_minus_latents": [r.get("target_ok") for r in rows],
           "input_is_mix": [r.get("input_ok") for r in rows], "noise_is_selection": [],
           "noise_sums": [float(r["noise"].double().sum()) for r in rows]}}
    for r, s in zip(rows, sel):
        again = immiscible.select_noise(r["latents"], s["k"], seed=s["seed"], mode=s["mode"], metric=s["metric"])
        res["noise_is_selection"].append(bool(torch.equal(again, r["noise"])))
    print("@@" + json.dumps(res), flush=True)
"""
    argv = ["--task", "t2v-tiny", "--dit", os.path.join(fixture, "dit_t2v-tiny_random_float32.safetensors"),
            "--dataset_config", os.path.join(fixture, "dataset.toml"), "--sdpa", "--mixed_precision", "no",
            "--network_module", "networks.lora_wan", "--network_dim", "4", "--network_alpha", "1",
            "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_train_steps", "2",
            "--max_data_loader_n_workers", "0", "--seed", "42", "--timestep_sampling", "shift",
            "--discrete_flow_shift", "3.0", "--output_dir", out, "--output_name", "wan_lora", *extra]
    e = dict(os.environ, IMMISCIBLE_MUSUBI_DUMP=os.path.join(out, "dump"), **(env or {}))
    res = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], env=e, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("@@")]
    info = json.loads(lines[-1][2:]) if lines else {}
    info.update(rc=res.returncode, tail=res.stderr[-3000:])
    return info


def _lora(out):
    from safetensors import safe_open

    with safe_open(os.path.join(out, "wan_lora.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _fixture(tmp):
    fixture = os.path.join(tmp, "fixture")
    if not os.path.exists(os.path.join(fixture, "dataset.toml")):
        subprocess.run([sys.executable, str(FIXTURES / "musubi_make_wan_fixture.py"), fixture, "--dtype", "float32",
                        "--task", "t2v-tiny"], check=True, capture_output=True)
    return fixture


def case_loop(tmp):
    fixture = _fixture(tmp)
    runs = {name: os.path.join(tmp, name) for name in ("k8", "k1", "off", "stock")}
    info = {"k8": _train(fixture, runs["k8"], ["--immiscible_k", "8"]),
            "k1": _train(fixture, runs["k1"], ["--immiscible_k", "1"]),
            "off": _train(fixture, runs["off"], []),
            "stock": _train(fixture, runs["stock"], [], env={"IMMISCIBLE_MUSUBI_DISABLE": "1"})}
    for name, i in info.items():
        assert i["rc"] == 0, (name, i["tail"])
    loras = {n: _lora(p) for n, p in runs.items()}

    def same(a, b):
        return a.keys() == b.keys() and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)

    stock = loras["stock"][0]
    k8 = dict(info["k8"], metadata={k: v for k, v in loras["k8"][1].items() if k.startswith("ss_immiscible")})
    k8.pop("tail")
    _emit({"k8": k8, "k1_equals_stock": same(loras["k1"][0], stock), "off_equals_stock": same(loras["off"][0], stock),
           "k8_equals_stock": same(loras["k8"][0], stock),
           "k1_noise_equals_stock": info["k1"]["noise_sums"] == info["stock"]["noise_sums"]})


def case_drift(tmp):
    """A copy of the checkout whose shared loop draws its noise some other way: a k > 1 run stops."""
    import shutil

    src = os.path.join(tmp, "musubi")
    shutil.copytree(os.path.join(os.getcwd(), "src"), os.path.join(src, "src"))
    path = os.path.join(src, "src/musubi_tuner/training/trainer_base.py")
    text = open(path).read().replace("noise = torch.randn_like(latents)",
                                     "noise = torch.randn(latents.shape, dtype=latents.dtype, device=latents.device)")
    open(path, "w").write(text)
    fixture = _fixture(tmp)
    os.chdir(src)
    sys.path.insert(0, os.path.join(src, "src"))
    info = _train(fixture, os.path.join(tmp, "out"), ["--immiscible_k", "8"],
                  env={"PYTHONPATH": os.path.join(src, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")})
    _emit({"rc": info["rc"], "msg": "\n".join(line for line in info["tail"].splitlines() if "immiscible" in line)})


if __name__ == "__main__":
    globals()["case_" + sys.argv[1]](*sys.argv[2:])
