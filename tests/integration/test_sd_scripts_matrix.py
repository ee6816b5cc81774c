"""kohya_patch on every sd-scripts version people run (issue 9): v0.8.7, the kohya_ss GUI pins, v0.10.1, main.

``SD_SCRIPTS_MATRIX`` lists ``CHECKOUT=PYTHON`` pairs (whitespace-separated): an sd-scripts checkout
and the venv python that runs it (``scripts/setup_integration.sh --matrix`` builds and prints them).
Every check runs in a subprocess of that python, this file run as a script, with the checkout as
working directory and ``PYTHONPATH=<pack>:<checkout>`` (a venv shared by checkouts imports the one
named first), as tests/integration/test_sd_scripts.py does for one checkout. For each version:

- every trainer script it ships offers the options (its own ``setup_parser()``);
- every trainer script it ships selects or refuses: start-up as that script with ``--immiscible_k 8``
  either refuses (its patch point is not in this version) or passes, and then the noise step the
  script's own code calls (the function object reached through the script's module, e.g.
  ``sdxl_train_network.train_util.get_noise_noisy_latents_and_timesteps``; the flow helper through
  the script's ``flux_train_utils``; the inline ControlNet draw, compiled under the script's real
  file and function name) returns ``immiscible.select_noise`` seeded from the trainer's own draw, and the
  real ``accelerate.Accelerator.backward`` lets the step through; without a selected draw it stops;
- the noise semantics of the real SD noise function (offset, multires, ip_noise_gamma keep acting
  on the selected base draw);
- k=1 and the option absent are bit-identical to an interpreter without the pack.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MATRIX = [tuple(e.split("=", 1)) for e in os.environ.get("SD_SCRIPTS_MATRIX", "").split() if "=" in e]
FLAGS = ["--immiscible_k", "8", "--immiscible_mode", "assign", "--immiscible_metric", "cosine",
         "--immiscible_backend", "torch", "--immiscible_coarse", "4", "--immiscible_validation"]
#: (name, flags): all exist from v0.8.7 on; a version whose parser lacks one skips that case.
SEMANTIC_CASES = [
    ("plain", []),
    ("noise_offset", ["--noise_offset", "0.05"]),
    ("multires", ["--multires_noise_iterations", "4", "--multires_noise_discount", "0.3"]),
    ("ip_noise_gamma", ["--ip_noise_gamma", "0.1"]),
    ("min_max_timestep", ["--min_timestep", "100", "--max_timestep", "900"]),
]
#: Trainers that do not import with their version's own pinned requirements (upstream, not ours).
UPSTREAM_BROKEN = ("train_textual_inversion_XTI.py",)


# =========================================================================== probes (run in the venv)


def _setup(patched=True):
    import logging

    sys.path.insert(0, os.getcwd())
    if patched:
        from kohya_patch.host import ADAPTER

        assert ADAPTER.hook.install()
    logging.disable(logging.WARNING)


def _emit(obj):
    print("@@" + json.dumps(obj), flush=True)


def _seed(s):
    import random

    import torch

    torch.manual_seed(s)
    random.seed(s)


def _expected(latents, k=8):
    """What selection returns: the trainer's own draw (after the same seed) seeds it (common random numbers)."""
    import torch

    import immiscible
    from immiscible_host.ranks import seed_from_draw

    return immiscible.select_noise(latents, k, seed=seed_from_draw(torch.randn_like(latents)))


def _latents(shape=(2, 4, 16, 16)):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def _route_files(root, script):
    """The script and the base trainer it subclasses (its noise call may live there)."""
    src = (root / script).read_text(encoding="utf-8")
    files = [script]
    for base in ("train_network", "train_textual_inversion", "train_control_net"):
        if f"import {base}" in src or f"from {base} import" in src:
            files.append(base + ".py")
    return files


def _select_through(root, mod, point, args):
    """Drive the noise step ``mod``'s code calls; True when it returned the selection."""
    import importlib
    import inspect

    import torch

    from immiscible_host.points import FLOW_NOISE, INLINE, SD_NOISE

    if point.kind == SD_NOISE:
        owner = next((getattr(m, "train_util") for m in (mod, *[sys.modules.get(f[:-3]) for f in
                      _route_files(root, mod.__name__ + ".py")]) if m is not None and hasattr(m, "train_util")),
                     None) or importlib.import_module(point.module)
        fn = getattr(owner, point.attribute)
        latents = _latents()
        _seed(3)
        noise = fn(args, _scheduler(), latents)[0]
        _seed(3)
        return bool(torch.equal(noise, _expected(latents)))
    if point.kind == FLOW_NOISE:
        short = point.module.rsplit(".", 1)[-1]
        owner = getattr(mod, short, None) or importlib.import_module(point.module)
        helper = getattr(owner, point.attribute)
        latents = _latents((2, 16, 8, 8))
        from library import sd3_train_utils

        kw = {"args": args, "noise_scheduler": sd3_train_utils.FlowMatchEulerDiscreteScheduler(1000, shift=3.0),
              "latents": latents, "device": "cpu", "dtype": torch.float32}
        _seed(3)
        noise = torch.randn_like(latents)  # the trainer's own draw
        kw["noise"] = noise
        params = inspect.signature(helper.__wrapped__).parameters
        helper(**{k: v for k, v in kw.items() if k in params})
        _seed(3)
        return bool(torch.equal(noise, _expected(latents)))
    if point.kind == INLINE:  # the draw as train() writes it, compiled under the script's own file name
        path = root / mod.__name__.replace(".", "/")
        path = root / (Path(getattr(mod, "__file__", "") or path).name)
        code = "import torch\ndef train(latents):\n    return torch.randn_like(latents, device=latents.device)\n"
        ns = {}
        exec(compile(code, str(path), "exec"), ns)
        latents = _latents()
        _seed(3)
        noise = ns["train"](latents)
        _seed(3)
        return bool(torch.equal(noise, _expected(latents)))
    return False


def probe_trainers():
    """Every shipped trainer: options offered; start-up as it selects or refuses; its noise step selects;
    accelerate's real backward lets a selected step through and stops an unselected one."""
    import importlib

    import accelerate
    import torch

    _setup()
    from immiscible_host.points import point_for_script
    from immiscible_host.runtime import SelectionNotApplied
    from immiscible_host import installer
    from kohya_patch.host import ADAPTER, HOST
    from kohya_patch.host import POINTS
    RUNTIME = ADAPTER.runtime

    root = Path(os.getcwd())
    acc = accelerate.Accelerator(cpu=True)
    out = {"version": HOST.describe(root), "trainers": {}}

    def backward():
        w = torch.ones(1, requires_grad=True)
        acc.backward((w * 2).sum())

    for script in installer.shipped_trainers(HOST, root):
        rec = out["trainers"][script] = {}
        try:
            mod = importlib.import_module(script[:-3])
            parser = mod.setup_parser()
            ns = parser.parse_args(FLAGS)
            rec["options"] = [ns.immiscible_k, ns.immiscible_mode, ns.immiscible_metric, ns.immiscible_backend,
                              ns.immiscible_coarse, ns.immiscible_validation] == [8, "assign", "cosine", "torch", 4, True]
            rec["default_off"] = parser.parse_args([]).immiscible_k == 1
        except BaseException as exc:  # noqa: BLE001
            rec["import_error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        point = point_for_script(POINTS, script)
        rec["point"] = point.name if point else None
        rec["calls_point"] = bool(point) and any(
            point.attribute + "(" in (root / f).read_text(encoding="utf-8") for f in _route_files(root, script)
            if (root / f).exists())
        ADAPTER.script = script
        RUNTIME.reset()
        args = parser.parse_args(["--immiscible_k", "8", "--immiscible_backend", "torch"])
        try:
            ADAPTER.start_up(args)
            rec["start_up"] = "ok"
        except BaseException as exc:  # noqa: BLE001
            rec["start_up"] = f"refused: {exc}"[:600]
            continue
        try:
            rec["selects"] = _select_through(root, mod, point, args) if point else False
        except BaseException as exc:  # noqa: BLE001
            rec["selects"] = f"{type(exc).__name__}: {exc}"[:300]
        try:
            backward()
            rec["guard"] = "passed"
        except SelectionNotApplied as exc:
            rec["guard"] = f"stopped: {exc}"[:300]
    # no draw went through the selection: the real Accelerator.backward stops the step
    ADAPTER.script = "train_network.py"
    RUNTIME.reset()
    ADAPTER.start_up(importlib.import_module("train_network").setup_parser().parse_args(["--immiscible_k", "8"]))
    try:
        backward()
        out["unselected_step"] = "ran"
    except SelectionNotApplied as exc:
        out["unselected_step"] = str(exc)
    out["backward_patched"] = bool(getattr(accelerate.Accelerator.backward, "__immiscible_patched__", False))
    out["static"] = {n: str(s) for n, s in installer.patch_point_report(HOST, root)}
    _emit(out)


def probe_semantics():
    """The real SD noise function: the selected draw is the base; upstream's steps act on it."""
    import importlib

    import torch

    _setup()
    from kohya_patch.host import ADAPTER

    ADAPTER.script = "train_network.py"
    from library import train_util

    parser = importlib.import_module("train_network").setup_parser()
    out = {}
    latents = _latents()
    sched = _scheduler()
    for name, extra in SEMANTIC_CASES:
        try:
            args = parser.parse_args(extra + ["--immiscible_k", "8", "--immiscible_backend", "torch"])
        except SystemExit:
            out[name] = "not in this version"
            continue
        train_util.verify_training_args(args)
        _seed(11)
        res = train_util.get_noise_noisy_latents_and_timesteps(args, sched, latents)
        noise, noisy, t = res[0], res[1], res[2]
        _seed(11)
        selected = _expected(latents)
        diff = noise - selected
        r = {"returns": len(res)}
        if name in ("plain", "min_max_timestep", "ip_noise_gamma"):
            r["noise_is_selection"] = bool(torch.equal(noise, selected))
        if name == "noise_offset":  # + offset * randn(B, C, 1, 1): constant over H, W
            r["offset_per_channel"] = bool(torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6)) and \
                bool(diff.abs().max() > 0)
        if name == "multires":
            r["differs_and_unit_std"] = bool(not torch.equal(noise, selected)) and abs(noise.std().item() - 1) < 1e-3
        r["noisy_from_noise"] = bool(torch.allclose(noisy, sched.add_noise(latents, noise, t), atol=1e-6)) \
            if name != "ip_noise_gamma" else not bool(torch.allclose(noisy, sched.add_noise(latents, noise, t)))
        if name == "min_max_timestep":
            r["timesteps_in_range"] = bool(((t >= 100) & (t < 900)).all())
        out[name] = r
    _emit(out)


def probe_dump(dest, patched):
    """Outputs and RNG states of the SD noise function at k=1 / option absent (patched) or without the pack."""
    import importlib
    import random

    import torch

    _setup(patched == "1")
    from library import train_util

    if patched == "1":
        from kohya_patch.host import ADAPTER

        ADAPTER.script = "train_network.py"
    parser = importlib.import_module("train_network").setup_parser()
    res = {}
    variants = [("absent", [])] + ([("k1", ["--immiscible_k", "1"])] if patched == "1" else [])
    latents = _latents()
    for vname, flags in variants:
        for name, extra in SEMANTIC_CASES:
            try:
                args = parser.parse_args(extra + flags)
            except SystemExit:
                continue
            train_util.verify_training_args(args)
            _seed(11)
            out = train_util.get_noise_noisy_latents_and_timesteps(args, _scheduler(), latents)
            res[f"{vname}/{name}"] = {**{f"out{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)},
                                      "rng": torch.get_rng_state(), "py_rng": torch.tensor(random.random())}
    torch.save(res, dest)
    _emit({"cases": sorted(res)})


# =========================================================================== pytest side

if __name__ != "__main__":
    import pytest

    pytestmark = [
        pytest.mark.integration,
        pytest.mark.skipif(not MATRIX, reason="SD_SCRIPTS_MATRIX is not set: these tests drive real sd-scripts "
                                              "checkouts, CHECKOUT=PYTHON pairs (scripts/setup_integration.sh --matrix)"),
    ]
    IDS = [Path(co).name for co, _ in MATRIX]

    def run_probe(entry, name, *args, patched=True, timeout=1200):
        co, py = entry
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), co]), "PYTHONHASHSEED": "0"}
        env["IMMISCIBLE_KOHYA_DISABLE"] = "" if patched else "1"
        res = subprocess.run([py, str(Path(__file__).resolve()), name, *map(str, args)], cwd=co, env=env,
                             capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
        assert res.returncode == 0 and lines, f"probe {name} failed ({res.returncode}):\n{res.stderr[-4000:]}"
        return json.loads(lines[-1][2:])

    _cache: dict = {}

    def trainers(entry):
        if entry not in _cache:
            _cache[entry] = run_probe(entry, "probe_trainers")
        return _cache[entry]

    @pytest.mark.parametrize("entry", MATRIX, ids=IDS)
    def test_every_shipped_trainer_offers_the_options_and_selects_or_refuses(entry):
        r = trainers(entry)
        assert r["trainers"], "no trainer scripts found"
        for script, rec in r["trainers"].items():
            if "import_error" in rec:
                assert script in UPSTREAM_BROKEN, (script, rec["import_error"])
                continue
            assert rec["options"] and rec["default_off"], (script, rec)
            assert rec["point"], f"{script}: not in the patch-point table"
            if rec["start_up"] != "ok":  # refused loudly, naming the point and the version
                assert rec["start_up"].startswith("refused: immiscible: patch point") and "sd-scripts version:" in \
                    rec["start_up"], (script, rec)
                assert not rec["calls_point"], f"{script} calls its point, yet start-up refused: {rec}"
                continue
            assert rec["calls_point"] or rec["point"].endswith("(inline noise)"), (script, rec)
            assert rec["selects"] is True, (script, rec)
            assert rec["guard"] == "passed", (script, rec)

    @pytest.mark.parametrize("entry", MATRIX, ids=IDS)
    def test_an_unselected_first_step_stops_naming_the_version(entry):
        r = trainers(entry)
        assert r["backward_patched"]
        msg = r["unselected_step"]
        assert msg.startswith("immiscible: --immiscible_k 8 was asked for") and "train_network.py" in msg
        assert f"(version {r['version']})" in msg and "install.py --check" in msg
        assert not r["version"].startswith("unknown"), r["version"]

    @pytest.mark.parametrize("entry", MATRIX, ids=IDS)
    def test_static_check_has_no_broken_point(entry):
        static = trainers(entry)["static"]
        assert all(not v.startswith("broken") for v in static.values()), static

    @pytest.mark.parametrize("entry", MATRIX, ids=IDS)
    def test_noise_semantics_through_the_real_functions(entry):
        r = run_probe(entry, "probe_semantics")
        assert r["plain"]["noise_is_selection"] and r["plain"]["noisy_from_noise"], r
        for case, checks in r.items():
            if checks == "not in this version":
                continue
            for key, ok in checks.items():
                assert key == "returns" or ok is True, (case, key, r)

    @pytest.mark.parametrize("entry", MATRIX, ids=IDS)
    def test_k1_and_absent_are_bit_identical_to_stock(entry, tmp_path):
        import torch

        run_probe(entry, "probe_dump", tmp_path / "patched.pt", 1)
        run_probe(entry, "probe_dump", tmp_path / "stock.pt", 0, patched=False)
        got, want = torch.load(tmp_path / "patched.pt"), torch.load(tmp_path / "stock.pt")
        assert got and want
        for key, tensors in got.items():
            ref = want["absent/" + key.split("/", 1)[1]]
            assert tensors.keys() == ref.keys(), key
            for field, value in tensors.items():
                assert torch.equal(value, ref[field]), (key, field)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
