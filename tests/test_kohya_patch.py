"""kohya_patch against a small fake of sd-scripts' ``library`` (no sd-scripts needed).

The fake's noise function is upstream's body verbatim (train_util.py:6071 at 48d368fa), so the
tests pin the mechanism; tests/integration/test_sd_scripts.py repeats them on the real code.
"""
from __future__ import annotations

import argparse
import importlib
import random
import sys
import textwrap

import pytest
import torch

import immiscible
from immiscible_host import telemetry
from immiscible_host.hook import MARK
from kohya_patch import host
from kohya_patch.host import ADAPTER

RUNTIME = ADAPTER.runtime

FAKE_TRAIN_UTIL = '''
import argparse, torch
from library import custom_train_functions

def add_training_arguments(parser, support_dreambooth):
    parser.add_argument("--noise_offset", type=float, default=None)
    parser.add_argument("--config_file", type=str, default=None)

def read_config_from_file(args, parser):
    return args

def verify_training_args(args):
    pass

def get_sai_model_spec(state_dict, args, sdxl, lora, textual_inversion, **kw):
    return {"modelspec.architecture": "fake"}

def get_timesteps(min_timestep, max_timestep, b_size, device):
    return torch.randint(min_timestep, max_timestep, (b_size,), device="cpu").long().to(device)

def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    noise = torch.randn_like(latents, device=latents.device)
    if args.noise_offset:
        if args.noise_offset_random_strength:
            noise_offset = torch.rand(1, device=latents.device) * args.noise_offset
        else:
            noise_offset = args.noise_offset
        noise = custom_train_functions.apply_noise_offset(latents, noise, noise_offset, args.adaptive_noise_scale)
    if args.multires_noise_iterations:
        noise = custom_train_functions.pyramid_noise_like(
            noise, latents.device, args.multires_noise_iterations, args.multires_noise_discount
        )
    b_size = latents.shape[0]
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = 1000 if args.max_timestep is None else args.max_timestep
    timesteps = get_timesteps(min_timestep, max_timestep, b_size, latents.device)
    if args.ip_noise_gamma:
        if args.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * args.ip_noise_gamma
        else:
            strength = args.ip_noise_gamma
        noisy_latents = noise_scheduler.add_noise(latents, noise + strength * torch.randn_like(latents), timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return noise, noisy_latents, timesteps
'''

FAKE_CUSTOM = '''
import random, torch

def pyramid_noise_like(noise, device, iterations=6, discount=0.4):
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn).to(device)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()

def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale):
    if noise_offset is None:
        return noise
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
'''

FAKE_FLUX = '''
import torch

def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):
    t = torch.rand(latents.shape[0], device=device)
    sigmas = t.view(-1, 1, 1, 1)
    return (sigmas * noise + (1.0 - sigmas) * latents).to(dtype), t * 1000, sigmas
'''

FAKE_ACCELERATE = '''
class Accelerator:
    def __init__(self):
        self.steps = 0
        self.trackers = []

    def backward(self, loss, **kwargs):
        self.steps += 1

    def init_trackers(self, name, config=None, init_kwargs=None):
        pass
'''


class Scheduler:
    """``add_noise`` of a DDPM schedule (stand-in for diffusers' DDPMScheduler)."""

    def __init__(self):
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def add_noise(self, x, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise


def make_args(**kw):
    base = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                multires_noise_iterations=None, multires_noise_discount=0.3, min_timestep=None, max_timestep=None,
                ip_noise_gamma=None, ip_noise_gamma_random_strength=False, immiscible_k=1, immiscible_mode="knn",
                immiscible_metric="l2", immiscible_backend="auto", immiscible_validation=False, no_metadata=False)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def fake_library(tmp_path, monkeypatch):
    """Import a fake ``library`` package through the installed hook; undo everything after."""
    pkg = tmp_path / "library"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train_util.py").write_text(FAKE_TRAIN_UTIL)
    (pkg / "custom_train_functions.py").write_text(FAKE_CUSTOM)
    (pkg / "flux_train_utils.py").write_text(FAKE_FLUX)
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "accelerate" / "__init__.py").write_text(FAKE_ACCELERATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved_randn_like = torch.randn_like
    for name in [m for m in sys.modules if m.split(".")[0] in ("library", "accelerate")]:
        monkeypatch.delitem(sys.modules, name)
    RUNTIME.reset()
    RUNTIME.points.clear()
    ADAPTER.hook.install()
    try:
        importlib.invalidate_caches()
        tu = importlib.import_module("library.train_util")
        flux = importlib.import_module("library.flux_train_utils")
        ctf = importlib.import_module("library.custom_train_functions")
        yield tu, flux, ctf
    finally:
        ADAPTER.hook.uninstall()
        RUNTIME.reset()
        for name in [m for m in sys.modules if m.split(".")[0] in ("library", "accelerate")]:
            del sys.modules[name]
        assert torch.randn_like is saved_randn_like


def unpatched(fn):
    return fn.__wrapped__


def call(fn, args, latents, seed=0):
    torch.manual_seed(seed)
    random.seed(seed)
    return fn(args, Scheduler(), latents)


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(123))


def test_hook_patches_all_points(fake_library):
    tu, flux, _ = fake_library
    for fn in (tu.add_training_arguments, tu.read_config_from_file, tu.verify_training_args,
               tu.get_sai_model_spec, tu.get_noise_noisy_latents_and_timesteps,
               flux.get_noisy_model_input_and_timesteps):
        assert getattr(fn, MARK, False), fn
    assert RUNTIME.points["train_util.get_noise_noisy_latents_and_timesteps"].ok
    ADAPTER.hook.install()  # idempotent: no double wrapping
    assert not getattr(tu.get_noise_noisy_latents_and_timesteps.__wrapped__, MARK, False)


@pytest.mark.parametrize("extra", [{}, {"noise_offset": 0.1, "adaptive_noise_scale": 0.01},
                                   {"multires_noise_iterations": 3}, {"ip_noise_gamma": 0.1},
                                   {"noise_offset": 0.1, "noise_offset_random_strength": True,
                                    "ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}])
def test_k1_is_bit_identical_and_touches_nothing(fake_library, extra):
    tu, _, _ = fake_library
    args = make_args(**extra)
    ADAPTER.start_up(args)
    got = call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)
    after = torch.get_rng_state(), random.getstate()
    want = call(unpatched(tu.get_noise_noisy_latents_and_timesteps), args, LATENTS)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert torch.equal(after[0], torch.get_rng_state()) and after[1] == random.getstate()


@pytest.mark.parametrize("extra", [{}, {"noise_offset": 0.1}, {"multires_noise_iterations": 3},
                                   {"ip_noise_gamma": 0.1}])
def test_selection_replaces_only_the_base_draw(fake_library, extra):
    tu, _, ctf = fake_library
    args = make_args(immiscible_k=8, **extra)
    ADAPTER.start_up(args)
    noise, noisy, t = call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)
    # the same seed stream, by hand: selection, then upstream's own steps
    torch.manual_seed(0)
    random.seed(0)
    want = immiscible.select_noise(LATENTS, 8)
    if args.noise_offset:
        want = ctf.apply_noise_offset(LATENTS, want, args.noise_offset, None)
    if args.multires_noise_iterations:
        want = ctf.pyramid_noise_like(want, "cpu", args.multires_noise_iterations, args.multires_noise_discount)
    want_t = tu.get_timesteps(0, 1000, 2, "cpu")
    eps = want + 0.1 * torch.randn_like(LATENTS) if args.ip_noise_gamma else want
    assert torch.equal(noise, want) and torch.equal(t, want_t)
    assert torch.equal(noisy, Scheduler().add_noise(LATENTS, eps, t))
    assert RUNTIME.window.for_log() > 0


def test_selection_is_reproducible_and_differs_from_stock(fake_library):
    tu, _, _ = fake_library
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    a = call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)[0]
    b = call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)[0]
    stock = call(unpatched(tu.get_noise_noisy_latents_and_timesteps), args, LATENTS)[0]
    assert torch.equal(a, b) and not torch.equal(a, stock)
    assert ((a - LATENTS) ** 2).sum() < ((stock - LATENTS) ** 2).sum()


def test_validation_noise_stays_stock(fake_library):
    tu, _, _ = fake_library

    def process_batch(args, is_train):  # sd-scripts' trainers pass is_train down to here
        return call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)[0]

    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    stock = call(unpatched(tu.get_noise_noisy_latents_and_timesteps), args, LATENTS)[0]
    assert torch.equal(process_batch(args, is_train=False), stock)
    assert not torch.equal(process_batch(args, is_train=True), stock)
    args.immiscible_validation = True
    ADAPTER.start_up(args)
    assert not torch.equal(process_batch(args, is_train=False), stock)


def test_flow_helper_overwrites_callers_noise_in_place(fake_library):
    tu, flux, _ = fake_library
    args = make_args(immiscible_k=4)
    ADAPTER.start_up(args)
    torch.manual_seed(5)
    noise = torch.randn_like(LATENTS)
    buf = noise.data_ptr()
    x, t, sigmas = flux.get_noisy_model_input_and_timesteps(args, None, LATENTS, noise, "cpu", torch.float32)
    torch.manual_seed(5)
    torch.randn_like(LATENTS)
    want = immiscible.select_noise(LATENTS, 4)
    assert noise.data_ptr() == buf and torch.equal(noise, want)
    assert torch.allclose(x, sigmas * want + (1 - sigmas) * LATENTS)  # input built from the target's noise


def test_failure_falls_back_to_stock_and_warns_once(fake_library, caplog):
    tu, _, _ = fake_library
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    with caplog.at_level("WARNING"):
        for _ in range(2):
            noise = call(tu.get_noise_noisy_latents_and_timesteps, args, bad)[0]
    assert torch.isfinite(noise).all()
    assert sum("NaN or infinite values" in r.message and "data or VAE problem" in r.message for r in caplog.records) == 1
    assert RUNTIME.stock_batches == 2


def test_ranks_draw_from_different_pools(fake_library, monkeypatch, tmp_path):
    tu, _, _ = fake_library
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    monkeypatch.setenv(host.HOST.dump_env, str(tmp_path / "dump"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        out[rank] = call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)[0]
    torch.manual_seed(0)
    drawn = immiscible.draw_seed()
    assert torch.equal(out[1], immiscible.select_noise(LATENTS, 8, seed=immiscible.derive_seed(drawn, 1)))
    assert not torch.equal(out[0], out[1])
    rows = [(tmp_path / "dump" / f"rank{r}.jsonl").read_text() for r in (0, 1)]
    assert all('"drawn_seed": %d' % drawn in r for r in rows)


def test_metadata_keys(fake_library):
    tu, _, _ = fake_library
    args = make_args()
    ADAPTER.start_up(args)
    assert tu.get_sai_model_spec(None, args, False, True, False) == {"modelspec.architecture": "fake"}
    args = make_args(immiscible_k=64, immiscible_mode="assign", immiscible_metric="cosine")
    ADAPTER.start_up(args)
    spec = tu.get_sai_model_spec(None, args, False, True, False)
    assert spec["ss_immiscible_k"] == "64" and spec["ss_immiscible_mode"] == "assign"
    assert spec["ss_immiscible_metric"] == "cosine"
    args.no_metadata = True
    assert "ss_immiscible_k" not in tu.get_sai_model_spec(None, args, False, True, False)


def test_tracker_gets_reduction(fake_library):
    tu, _, _ = fake_library
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    logged = []

    class Tracker:
        def log(self, values, step=None):
            logged.append((dict(values), step))

    tracker = Tracker()
    telemetry.wrap_tracker(tracker, RUNTIME.window)
    call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)
    tracker.log({"loss/current": 1.0}, step=1)
    tracker.log({"loss/epoch_average": 1.0}, step=1)
    assert 0 < logged[0][0]["immiscible/reduction"] < 1
    assert "immiscible/reduction" not in logged[1][0]


def test_start_up_validates_and_reports(fake_library, monkeypatch, caplog):
    tu, _, _ = fake_library
    parser = argparse.ArgumentParser()
    tu.add_training_arguments(parser, True)
    ns = parser.parse_args(["--immiscible_k", "8", "--immiscible_mode", "assign"])
    assert ns.immiscible_k == 8 and ns.immiscible_mode == "assign"
    with caplog.at_level("INFO"):
        tu.verify_training_args(ns)
    assert any("immiscible: k=8 mode=assign" in r.message for r in caplog.records)
    ns.immiscible_k = "64"  # a TOML string
    with pytest.raises(SystemExit):
        tu.read_config_from_file(ns, parser)
    with pytest.raises(ValueError, match="immiscible_k"):
        tu.verify_training_args(ns)
    ns.immiscible_k, ns.knn_noise_k = 8, 4
    with pytest.raises(ValueError, match="knn_noise_k"):
        tu.verify_training_args(ns)


def test_missing_patch_point_errors_when_on_and_warns_when_off(fake_library, monkeypatch, caplog):
    monkeypatch.setattr(ADAPTER, "script", "sd3_train_network.py")
    with pytest.raises(ValueError, match="sd3_train_utils.get_noisy_model_input_and_timesteps"):
        ADAPTER.start_up(make_args(immiscible_k=8))
    with caplog.at_level("WARNING"):
        ADAPTER.start_up(make_args())
    assert any("sd3_train_utils" in r.message for r in caplog.records)


@pytest.mark.parametrize("script,module", [("train_control_net.py", "train_control_net"),
                                           ("train_controlnet.py", "__main__")])  # v0.8.7 / v0.9.1 name
def test_train_control_net_inline_noise(fake_library, tmp_path, monkeypatch, script, module):
    src = textwrap.dedent('''
        import torch
        def train(latents):
            noise = torch.randn_like(latents, device=latents.device)
            return noise
        def helper(latents):
            return torch.randn_like(latents)
    ''')
    path = tmp_path / script
    path.write_text(src)
    mod = {}
    exec(compile(src, str(path), "exec"), mod)
    monkeypatch.setattr(ADAPTER, "script", script)
    monkeypatch.delitem(sys.modules, "train_control_net", raising=False)
    monkeypatch.setitem(sys.modules, module, type(sys)(module))
    sys.modules[module].train = mod["train"]
    sys.modules[module].__file__ = str(path)
    saved = torch.randn_like
    try:
        ADAPTER.start_up(make_args(immiscible_k=8))
        assert RUNTIME.points["train_control_net.train (inline noise)"].ok
        torch.manual_seed(0)
        noise = mod["train"](LATENTS)
        torch.manual_seed(0)
        want = immiscible.select_noise(LATENTS, 8)
        assert torch.equal(noise, want)
        torch.manual_seed(0)
        other = mod["helper"](LATENTS)  # any other caller: stock
        torch.manual_seed(0)
        assert torch.equal(other, torch.randn_like.__immiscible_next__(LATENTS))
    finally:
        torch.randn_like = saved


def test_train_control_net_without_inline_draw_is_an_error_when_on(fake_library, monkeypatch):
    module = type(sys)("train_control_net")
    exec("import torch\ndef train(latents):\n    return torch.randn(latents.shape)\n", module.__dict__)
    monkeypatch.setattr(ADAPTER, "script", "train_control_net.py")
    monkeypatch.setitem(sys.modules, "train_control_net", module)
    saved = torch.randn_like
    try:
        with pytest.raises(ValueError, match="train_control_net.train .inline noise. needed by train_control_net.py"):
            ADAPTER.start_up(make_args(immiscible_k=8))
        assert torch.randn_like is saved  # nothing intercepted
    finally:
        torch.randn_like = saved


def test_stock_batches_are_counted(fake_library):
    tu, flux, _ = fake_library
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    for _ in range(3):
        call(tu.get_noise_noisy_latents_and_timesteps, args, bad)
    flux.get_noisy_model_input_and_timesteps(args, None, LATENTS, torch.zeros(1, 4, 8, 8), "cpu", torch.float32)
    call(tu.get_noise_noisy_latents_and_timesteps, args, LATENTS)  # a good batch: not counted
    assert RUNTIME.stock_batches == 4
    assert RUNTIME.stock_reasons == {"select:non-finite-latents": 3,
                                     "shape:flux_train_utils.get_noisy_model_input_and_timesteps": 1}
    assert RUNTIME.calls == 1


def test_a_broken_point_is_reported_and_left_unwrapped(tmp_path, monkeypatch):
    pkg = tmp_path / "library"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sd3_train_utils.py").write_text("def get_noisy_model_input_and_timesteps(args, latents, x, d, t):\n"
                                            "    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "library" or m.startswith("library.")]:
        monkeypatch.delitem(sys.modules, name)
    RUNTIME.points.clear()
    ADAPTER.hook.install()
    try:
        importlib.invalidate_caches()
        sd3 = importlib.import_module("library.sd3_train_utils")
        assert not getattr(sd3.get_noisy_model_input_and_timesteps, MARK, False)
        status = RUNTIME.points["sd3_train_utils.get_noisy_model_input_and_timesteps"]
        assert status.state == "broken" and "noise" in status.detail
        monkeypatch.setattr(ADAPTER, "script", "sd3_train_network.py")
        with pytest.raises(ValueError, match="broken .parameters"):
            ADAPTER.start_up(make_args(immiscible_k=4))
    finally:
        ADAPTER.hook.uninstall()
        RUNTIME.reset()
        RUNTIME.points.clear()
        for name in [m for m in sys.modules if m == "library" or m.startswith("library.")]:
            del sys.modules[name]
