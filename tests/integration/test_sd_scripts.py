"""kohya_patch on the real kohya-ss/sd-scripts: parsers, config files and noise functions.

Needs ``SD_SCRIPTS_DIR`` (a checkout) and a Python that can import it, ``IMMISCIBLE_VENV``
(default: the interpreter running pytest). pytest itself can run anywhere: every check runs in
a subprocess of that interpreter, this file run as a script (``python test_sd_scripts.py PROBE``),
with sd-scripts' folder as the working directory. See docs/sd-scripts.md.

    eval "$(scripts/setup_integration.sh /work/ext)"
    .venv/bin/python -m pytest tests/integration/test_sd_scripts.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SD = os.environ.get("SD_SCRIPTS_DIR")
PY = os.environ.get("IMMISCIBLE_VENV") or sys.executable

TRAINERS = [
    "train_network", "sdxl_train_network", "fine_tune", "sdxl_train", "train_db", "train_textual_inversion",
    "train_textual_inversion_XTI", "sdxl_train_textual_inversion", "sdxl_train_control_net",
    "sdxl_train_control_net_lllite", "train_control_net", "flux_train", "flux_train_network",
    "flux_train_control_net", "sd3_train", "sd3_train_network", "lumina_train", "lumina_train_network",
    "hunyuan_image_train_network", "anima_train", "anima_train_network",
]
#: Trainers that do not import with sd-scripts' own pinned requirements (an upstream problem, not ours).
UPSTREAM_BROKEN = {"train_textual_inversion_XTI": "diffusers.models.unet_2d_condition"}
FLAGS = ["--immiscible_k", "8", "--immiscible_mode", "assign", "--immiscible_metric", "cosine",
         "--immiscible_backend", "torch", "--immiscible_coarse", "4", "--immiscible_validation"]
#: (name, extra CLI flags) for the SD noise function. noise offset + multires together is refused upstream.
NOISE_CASES = [
    ("plain", []),
    ("noise_offset", ["--noise_offset", "0.05", "--adaptive_noise_scale", "0.01"]),
    ("noise_offset_random", ["--noise_offset", "0.1", "--noise_offset_random_strength"]),
    ("multires", ["--multires_noise_iterations", "4", "--multires_noise_discount", "0.3"]),
    ("ip_noise_gamma", ["--ip_noise_gamma", "0.1"]),
    ("ip_noise_gamma_random", ["--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength"]),
    ("v_parameterization", ["--v_parameterization", "--noise_offset", "0.05", "--ip_noise_gamma", "0.05"]),
    ("timestep_range", ["--min_timestep", "100", "--max_timestep", "900", "--multires_noise_iterations", "2"]),
]


# =========================================================================== probes (run in the venv)


def _setup(patched: bool = True):
    import logging

    sys.path.insert(0, os.getcwd())
    if patched:
        from kohya_patch.host import ADAPTER

        assert ADAPTER.hook.install(), "the kohya_patch hook is disabled (IMMISCIBLE_KOHYA_DISABLE)"
    logging.disable(logging.WARNING)


def _emit(obj) -> None:
    print("@@" + json.dumps(obj), flush=True)


def probe_parsers():
    """Every trainer's own ``setup_parser()`` accepts the options."""
    import importlib

    _setup()
    out = {}
    for name in TRAINERS:
        try:
            parser = importlib.import_module(name).setup_parser()
            ns = parser.parse_args(FLAGS)
            out[name] = {"ok": True, "values": [ns.immiscible_k, ns.immiscible_mode, ns.immiscible_metric,
                                                ns.immiscible_backend, ns.immiscible_coarse, ns.immiscible_validation],
                         "default_k": parser.parse_args([]).immiscible_k,
                         "help": "--immiscible_k" in parser.format_help() and "推奨" in parser.format_help()}
        except BaseException as exc:  # noqa: BLE001 - report, the test decides
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    _emit(out)


def _read_config(parser, path):
    import contextlib
    import io

    from library import train_util

    err = io.StringIO()
    argv, sys.argv = sys.argv, ["train.py", "--config_file", str(path)]  # upstream re-parses sys.argv
    try:
        with contextlib.redirect_stderr(err):
            ns = train_util.read_config_from_file(parser.parse_args(sys.argv[1:]), parser)
        return {"ok": True, "k": ns.immiscible_k, "mode": ns.immiscible_mode, "metric": ns.immiscible_metric,
                "backend": ns.immiscible_backend, "coarse": ns.immiscible_coarse, "validation": ns.immiscible_validation}
    except SystemExit as exc:
        return {"ok": False, "code": exc.code, "stderr": err.getvalue()[-400:]}
    finally:
        sys.argv = argv


def probe_config(tmp):
    """``--config_file`` sets the options; bad TOML values fail cleanly; configs/ parse and validate."""
    import importlib

    import toml

    _setup()
    from library import config_util

    parser = importlib.import_module("train_network").setup_parser()
    out = {"cases": {}, "configs": {}, "datasets": {}}
    cases = {"good": 'immiscible_k = 16\nimmiscible_mode = "knn"\nimmiscible_metric = "cosine"\nimmiscible_coarse = 8\n',
             "negative_coarse": "immiscible_coarse = -2\n", "float_coarse": "immiscible_coarse = 8.0\n",
             "string_k": 'immiscible_k = "64"\n', "float_k": "immiscible_k = 64.5\n", "zero_k": "immiscible_k = 0\n",
             "negative_k": "immiscible_k = -3\n", "bad_mode": 'immiscible_mode = "hungarian"\n',
             "bad_flag": 'immiscible_validation = "yes"\n',
             # issue 17: keys sd-scripts would keep silently, training on stock noise
             "typo_case": "immiscible_K = 8\n", "typo_edit": "immisible_k = 8\n", "typo_dash": "immiscible-k = 8\n"}
    for name, body in cases.items():
        path = Path(tmp) / f"{name}.toml"
        path.write_text("[immiscible]\n" + body)
        out["cases"][name] = _read_config(parser, path)
    for cfg, trainer in (("sd15_lora", "train_network"), ("sdxl_lora", "sdxl_train_network"),
                         ("flux_lora", "flux_train_network")):
        p = importlib.import_module(trainer).setup_parser()
        out["configs"][cfg] = _read_config(p, REPO / "configs" / f"{cfg}.toml")
    for ds in sorted((REPO / "configs").glob("dataset_*.toml")):
        if ds.name == "dataset_wan21.toml":  # musubi-tuner's schema: tests/integration/test_musubi.py checks it
            continue
        try:
            config_util.ConfigSanitizer(True, True, False, True).sanitize_user_config(toml.load(ds))
            out["datasets"][ds.name] = "ok"
        except Exception as exc:  # noqa: BLE001
            out["datasets"][ds.name] = f"{type(exc).__name__}: {exc}"
    _emit(out)


def _sd_setup(patched, extra):
    import importlib

    from diffusers import DDPMScheduler

    parser = importlib.import_module("train_network").setup_parser()
    args = parser.parse_args(extra)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    return args, sched


def _latents(seed=7, shape=(2, 4, 16, 16)):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed_all(seed):
    import random

    import torch

    torch.manual_seed(seed)
    random.seed(seed)


def probe_sd_noise():
    """Patched ``get_noise_noisy_latents_and_timesteps`` == upstream's steps applied to ``select_noise``."""
    import torch

    _setup()
    import immiscible
    from immiscible_host.ranks import seed_from_draw
    from library import custom_train_functions as ctf
    from library import train_util

    out = {}
    latents = _latents()
    for name, extra in NOISE_CASES:
        for k, mode, coarse in ((8, "knn", 0), (3, "assign", 0), (8, "knn", 4)):
            args, sched = _sd_setup(True, extra + ["--immiscible_k", str(k), "--immiscible_mode", mode,
                                                   "--immiscible_coarse", str(coarse)])
            train_util.verify_training_args(args)
            _seed_all(11)
            noise, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(args, sched, latents)
            target = sched.get_velocity(latents, noise, t) if args.v_parameterization else noise
            rng_after = torch.get_rng_state()
            # the same seed stream by hand: upstream's own draw seeds the selection (common random
            # numbers), then upstream's own code for everything else
            _seed_all(11)
            want = immiscible.select_noise(latents, k, mode=mode, coarse=coarse,
                                           seed=seed_from_draw(torch.randn_like(latents)))
            selected = want.clone()
            if args.noise_offset:
                off = torch.rand(1) * args.noise_offset if args.noise_offset_random_strength else args.noise_offset
                want = ctf.apply_noise_offset(latents, want, off, args.adaptive_noise_scale)
            if args.multires_noise_iterations:
                want = ctf.pyramid_noise_like(want, latents.device, args.multires_noise_iterations,
                                              args.multires_noise_discount)
            lo = 0 if args.min_timestep is None else args.min_timestep
            hi = 1000 if args.max_timestep is None else args.max_timestep
            want_t = train_util.get_timesteps(lo, hi, latents.shape[0], latents.device)
            eps = want
            if args.ip_noise_gamma:
                s = torch.rand(1) * args.ip_noise_gamma if args.ip_noise_gamma_random_strength else args.ip_noise_gamma
                eps = want + s * torch.randn_like(latents)
            want_noisy = sched.add_noise(latents, eps, want_t)
            want_target = sched.get_velocity(latents, want, want_t) if args.v_parameterization else want
            _seed_all(11)
            stock, _, stock_t = train_util.get_noise_noisy_latents_and_timesteps.__wrapped__(args, sched, latents)
            out[f"{name}/k{k}/{mode}/coarse{coarse}"] = {
                # issue 18: the host's random streams are stock's at any k (timesteps, the generator after)
                "timesteps_as_stock": bool(torch.equal(t, stock_t)),
                "rng_as_stock": bool(torch.equal(rng_after, torch.get_rng_state())),
                "noise": bool(torch.equal(noise, want)), "timesteps": bool(torch.equal(t, want_t)),
                "noisy": bool(torch.equal(noisy, want_noisy)), "target": bool(torch.equal(target, want_target)),
                "differs_from_stock": not torch.equal(noise, stock),
                "selected_is_base": bool(torch.equal(noise, selected)) if name == "plain" else None,
            }
    _emit(out)


def probe_validation():
    """The real ``NetworkTrainer.get_noise_pred_and_target``: training selects, validation stays stock."""
    import contextlib
    import importlib

    import torch

    _setup()
    import immiscible
    from immiscible_host.ranks import seed_from_draw

    tn = importlib.import_module("train_network")

    class Trainer(tn.NetworkTrainer):
        def call_unet(self, args, accelerator, unet, noisy_latents, *a, **kw):
            return torch.zeros_like(noisy_latents)

    class Accelerator:
        autocast = staticmethod(contextlib.nullcontext)

    out = {}
    latents = _latents()
    for flags in ([], ["--immiscible_validation"]):
        args, sched = _sd_setup(True, ["--immiscible_k", "8"] + flags)
        tn.train_util.verify_training_args(args)
        targets = {}
        for is_train in (True, False):
            _seed_all(5)
            targets[is_train] = Trainer().get_noise_pred_and_target(
                args, Accelerator(), sched, latents, {}, [None], None, None, torch.float32, True, is_train=is_train)[1]
        _seed_all(5)
        stock = torch.randn_like(latents)
        selected = immiscible.select_noise(latents, 8, seed=seed_from_draw(stock))   # seeded from upstream's draw
        key = "validation_flag" if flags else "default"
        out[key] = {"train_selected": bool(torch.equal(targets[True], selected)),
                    "validation_selected": bool(torch.equal(targets[False], selected)),
                    "validation_stock": bool(torch.equal(targets[False], stock))}
    _emit(out)


def probe_sd_dump(dest, patched):
    """Outputs and RNG states at k == 1 (patched) or with no pack at all (unpatched), for comparison."""
    import random

    import torch

    _setup(patched == "1")
    from library import train_util

    res = {}
    latents = _latents()
    variants = [("absent", [])] + ([("k1", ["--immiscible_k", "1"]),
                                    ("k1_all", ["--immiscible_k", "1", "--immiscible_mode", "assign",
                                                "--immiscible_validation"])] if patched == "1" else [])
    for vname, flags in variants:
        for name, extra in NOISE_CASES:
            args, sched = _sd_setup(patched == "1", extra + flags)
            train_util.verify_training_args(args)
            _seed_all(11)
            noise, noisy, t = train_util.get_noise_noisy_latents_and_timesteps(args, sched, latents)
            target = sched.get_velocity(latents, noise, t) if args.v_parameterization else noise
            res[f"{vname}/{name}"] = {"noise": noise, "noisy": noisy, "t": t, "target": target,
                                      "rng": torch.get_rng_state(), "py_rng": torch.tensor(random.random())}
    known = hasattr(_sd_setup(False, [])[0], "immiscible_k")
    torch.save(res, dest)
    _emit({"cases": sorted(res), "parser_has_option": known,
           "patched": getattr(train_util.get_noise_noisy_latents_and_timesteps, "__immiscible_patched__", False)})


def probe_flow():
    """FLUX, SD3 and Lumina helpers: the caller's noise is the selection, in place, and builds the input."""
    import importlib

    import torch

    _setup()
    import immiscible
    from immiscible_host.ranks import seed_from_draw
    from library import flux_train_utils, lumina_train_util, sd3_train_utils

    out = {}
    sched = sd3_train_utils.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    latents = _latents(shape=(2, 16, 8, 8))
    cases = [
        ("flux", "flux_train_network", flux_train_utils, ["--timestep_sampling", "shift"], True),
        ("flux_ip_gamma", "flux_train_network", flux_train_utils, ["--ip_noise_gamma", "0.1"], True),
        ("sd3", "sd3_train_network", sd3_train_utils, [], False),
        ("lumina", "lumina_train_network", lumina_train_util, [], True),
    ]
    for name, trainer, mod, extra, takes_sched in cases:
        args = importlib.import_module(trainer).setup_parser().parse_args(extra + ["--immiscible_k", "4"])
        mod_train_util = importlib.import_module("library.train_util")
        mod_train_util.verify_training_args(args)
        helper = mod.get_noisy_model_input_and_timesteps
        _seed_all(3)
        noise = torch.randn_like(latents)  # the trainer's own draw
        ptr = noise.data_ptr()
        pre = (args, sched, latents, noise) if takes_sched else (args, latents, noise)
        x, t, sigmas = helper(*pre, "cpu", torch.float32)
        target = noise - latents if name != "sd3" else latents  # flux-style target; SD3 predicts latents via noise
        rng_after = torch.get_rng_state()
        _seed_all(3)
        want = immiscible.select_noise(latents, 4, seed=seed_from_draw(torch.randn_like(latents)))
        _, stock_t, _ = helper.__wrapped__(*(pre[:-1] + (want.clone(),)), "cpu", torch.float32)  # upstream's own
        if name == "sd3":
            rebuilt = sigmas * noise + (1.0 - sigmas) * latents
        else:
            rebuilt = (1.0 - sigmas) * latents + sigmas * noise
        out[name] = {
            "patched": bool(getattr(helper, "__immiscible_patched__", False)),
            "in_place": noise.data_ptr() == ptr,
            "noise_is_selection": bool(torch.equal(noise, want)),
            "rng_as_stock": bool(torch.equal(rng_after, torch.get_rng_state())),
            "timesteps_as_stock": bool(torch.equal(t, stock_t)),
            "input_from_same_noise": bool(torch.equal(x, rebuilt)) if "ip" not in name else None,
            "target_from_same_noise": bool(torch.equal(target, want - latents)) if name != "sd3" else None,
        }
    _emit(out)


def probe_points():
    """Every patch point's status in a patched process, the start-up check of both ControlNet script
    names, and ``install.py --check``'s static report of this checkout."""
    import importlib

    _setup()
    from immiscible_host import installer
    from kohya_patch.host import ADAPTER, HOST
    RUNTIME = ADAPTER.runtime

    for name in ("library.train_util", "library.flux_train_utils", "library.sd3_train_utils",
                 "library.lumina_train_util"):
        importlib.import_module(name)
    out = {"runtime": {name: str(status) for name, status in RUNTIME.points.items()}, "controlnet": {}}
    parser = importlib.import_module("train_control_net").setup_parser()
    importlib.import_module("train_controlnet")  # the deprecated shim imports train() from train_control_net
    for script in ("train_control_net.py", "train_controlnet.py"):
        ADAPTER.script = script
        try:
            ADAPTER.start_up(parser.parse_args(["--immiscible_k", "8"]))
            out["controlnet"][script] = str(RUNTIME.points["train_control_net.train (inline noise)"])
        except Exception as exc:  # noqa: BLE001
            out["controlnet"][script] = f"{type(exc).__name__}: {exc}"
    out["static"] = {name: str(status) for name, status in installer.patch_point_report(HOST, Path(os.getcwd()))}
    _emit(out)


# =========================================================================== pytest side

if __name__ != "__main__":
    import pytest

    pytestmark = [
        pytest.mark.integration,
        pytest.mark.skipif(not SD, reason="SD_SCRIPTS_DIR is not set: these tests drive a real kohya-ss/sd-scripts "
                                          "checkout (see docs/sd-scripts.md, scripts/setup_integration.sh)"),
    ]

    def run_probe(name, *args, patched=True, timeout=900):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), SD]), "PYTHONHASHSEED": "0"}
        if not patched:
            env["IMMISCIBLE_KOHYA_DISABLE"] = "1"
        res = subprocess.run([PY, str(Path(__file__).resolve()), name, *map(str, args)], cwd=SD, env=env,
                             capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
        assert res.returncode == 0 and lines, f"probe {name} failed ({res.returncode}):\n{res.stderr[-4000:]}"
        return json.loads(lines[-1][2:])

    @pytest.fixture(scope="module")
    def parsers():
        return run_probe("probe_parsers")

    @pytest.mark.parametrize("trainer", TRAINERS)
    def test_every_trainer_parser_accepts_the_options(parsers, trainer):
        r = parsers[trainer]
        if not r["ok"] and UPSTREAM_BROKEN.get(trainer, "@") in r["error"]:
            pytest.xfail(f"{trainer} does not import upstream: {r['error']}")
        assert r["ok"], r.get("error")
        assert r["values"] == [8, "assign", "cosine", "torch", 4, True]
        assert r["default_k"] == 1 and r["help"]

    def test_config_file_sets_options_and_rejects_bad_values(tmp_path):
        r = run_probe("probe_config", tmp_path)
        good = r["cases"]["good"]
        assert good == {"ok": True, "k": 16, "mode": "knn", "metric": "cosine", "backend": "auto", "coarse": 8,
                        "validation": False}
        for bad, needle in (("string_k", "'64'"), ("float_k", "64.5"), ("zero_k", "got 0"), ("negative_k", "got -3"),
                            ("bad_mode", "hungarian"), ("bad_flag", "'yes'"), ("negative_coarse", "got -2"),
                            ("float_coarse", "8.0"), ("typo_case", "did you mean immiscible_k"),
                            ("typo_edit", "'immisible_k'"), ("typo_dash", "'immiscible-k'")):
            c = r["cases"][bad]
            assert not c["ok"] and c["code"] == 2, (bad, c)
            assert "immiscible_" in c["stderr"] and needle in c["stderr"], (bad, c["stderr"])
        assert "[1, 65536]" in r["cases"]["string_k"]["stderr"]
        for cfg, k in (("sd15_lora", 64), ("sdxl_lora", 64), ("flux_lora", 4)):
            assert r["configs"][cfg]["ok"] and r["configs"][cfg]["k"] == k, r["configs"][cfg]
        assert r["datasets"] and all(v == "ok" for v in r["datasets"].values()), r["datasets"]

    def test_patched_noise_equals_select_noise_under_the_same_seed_stream():
        r = run_probe("probe_sd_noise")
        assert len(r) == 3 * len(NOISE_CASES)
        for case, checks in r.items():
            for check, ok in checks.items():
                assert ok in (True, None), (case, check)

    def test_validation_passes_keep_stock_noise_unless_asked():
        r = run_probe("probe_validation")
        assert r["default"] == {"train_selected": True, "validation_selected": False, "validation_stock": True}
        assert r["validation_flag"] == {"train_selected": True, "validation_selected": True,
                                        "validation_stock": False}

    def test_k1_is_bit_identical_to_an_unpatched_interpreter(tmp_path):
        import torch

        a = run_probe("probe_sd_dump", tmp_path / "patched.pt", 1)
        b = run_probe("probe_sd_dump", tmp_path / "stock.pt", 0, patched=False)
        assert a["patched"] and a["parser_has_option"] and not b["patched"] and not b["parser_has_option"]
        got, want = torch.load(tmp_path / "patched.pt"), torch.load(tmp_path / "stock.pt")
        for key, tensors in got.items():
            ref = want["absent/" + key.split("/", 1)[1]]
            for field, value in tensors.items():
                assert torch.equal(value, ref[field]), (key, field)

    def test_every_patch_point_is_ok_at_run_time_and_statically():
        from kohya_patch.host import POINTS

        r = run_probe("probe_points")
        names = [p.name for p in POINTS]
        assert sorted(r["runtime"]) == sorted(n for n, p in zip(names, POINTS) if p.kind != "inline")
        assert all(v == "ok" for v in r["runtime"].values()), r["runtime"]
        assert r["controlnet"] == {"train_control_net.py": "ok", "train_controlnet.py": "ok"}
        assert list(r["static"]) == names and all(v == "ok" for v in r["static"].values()), r["static"]

    def test_flow_matching_helpers_use_the_selected_noise_in_place():
        r = run_probe("probe_flow")
        for case, checks in r.items():
            for check, ok in checks.items():
                assert ok in (True, None), (case, check)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
