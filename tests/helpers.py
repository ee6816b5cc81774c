"""Independent fp64 references for the selector tests."""


def fp64_distances_knn(latents, cands):
    """Squared L2 in float64: latents [B, ...], cands [B, k, ...] -> [B, k]."""
    x = latents.double().flatten(1)[:, None, :]
    return (cands.double().flatten(2) - x).square().sum(-1)


def fp64_distances_pool(latents, pool):
    """Squared L2 in float64: latents [B, ...], pool [P, ...] -> [B, P]."""
    x = latents.double().flatten(1)
    p = pool.double().flatten(1)
    return (x[:, None, :] - p[None, :, :]).square().sum(-1)


def fake_adapter(points=(), script: str | None = None, **fields):
    """An :class:`~immiscible_host.adapter.Adapter` over a made-up host (a guard point is added when
    the table has none), running ``script``."""
    from immiscible_host.adapter import Adapter, Host
    from immiscible_host.points import GUARD, INLINE, OPTIONS, PatchPoint

    points = tuple(points)
    if not any(p.kind == GUARD for p in points):
        points += (PatchPoint("fake.Step.backward", "fakelib", "Step.backward", GUARD, patched_with="fakepkg.util",
                              in_host=False),)
    identified = {p.module for p in points if p.identifies}
    for module in dict.fromkeys(p.trigger for p in points if p.kind != INLINE):
        if module not in identified:
            points += (PatchPoint(f"{module}.add_args", module, "add_args", OPTIONS, params=("parser",),
                                  identifies=True),)
    host = Host(**{"name": "fakehost", "package": "fake_patch", "short": "fake", "points": points, "k_help": "k",
                   "install_flag": "--fakehost", "disable_env": "FAKE_DISABLE", "dump_env": "FAKE_DUMP",
                   "checkout_file": "fakepkg/util.py", "root_module": ("fakepkg.util", 2),
                   "trainer_globs": ("*train*.py",), "version_files": ("fakepkg", ("*.py",)), **fields})
    adapter = Adapter(host)
    adapter.script = script
    return adapter


# --------------------------------------------------------------------------- fake host programs
# Small fakes of sd-scripts (``library``) and musubi-tuner (``musubi_tuner``), each beside a fake
# ``accelerate``, written to a folder and imported through the real adapter's import hook. A
# :class:`FakeHost` drives one like its trainers do: parse (options, config file, start-up), one
# training step's draw and backward, a saved model's metadata. tests/test_adapters.py runs the
# behaviour both adapters share once per host; tests/test_kohya_patch.py and
# tests/test_musubi_patch.py keep what only one host has.


# (this section's imports: the functions above import lazily)
import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

import immiscible  # noqa: E402
from immiscible_host import randn_like as _randn_like  # noqa: E402
from immiscible_host.ranks import seed_from_draw  # noqa: E402
from kohya_patch.host import ADAPTER as KOHYA_ADAPTER  # noqa: E402
from musubi_patch.host import ADAPTER as MUSUBI_ADAPTER  # noqa: E402

FAKE_ACCELERATE = '''
class Tracker:
    def __init__(self):
        self.logged = []

    def log(self, values, step=None, **kwargs):
        self.logged.append(dict(values))


class Accelerator:
    def __init__(self):
        self.steps = 0
        self.trackers = []

    def backward(self, loss, **kwargs):
        self.steps += 1

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        self.trackers = [Tracker()]

    def log(self, values, step=None):
        for tracker in self.trackers:
            tracker.log(values, step=step)
'''

#: The config-file reader of both hosts (sd-scripts' train_util.py:4700, musubi-tuner's
#: parser_common.py:780): TOML sections flattened, the command line over the file's values.
_READ_CONFIG = '''
def read_config_from_file(args, parser):
    if not args.config_file:
        return args
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(args.config_file, "rb") as f:
        config = tomllib.load(f)
    flat = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return parser.parse_args(namespace=argparse.Namespace(**flat))
'''

#: sd-scripts' ``library.train_util``; the noise function is upstream's body verbatim
#: (train_util.py:6071 at 48d368fa), so the tests pin the mechanism.
SD_TRAIN_UTIL = '''
import argparse, torch
from library import custom_train_functions

def add_training_arguments(parser, support_dreambooth):
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--config_file", type=str, default=None)
    parser.add_argument("--no_metadata", action="store_true")
    parser.add_argument("--noise_offset", type=float, default=None)
    parser.add_argument("--noise_offset_random_strength", action="store_true")
    parser.add_argument("--adaptive_noise_scale", type=float, default=None)
    parser.add_argument("--multires_noise_iterations", type=int, default=None)
    parser.add_argument("--multires_noise_discount", type=float, default=0.3)
    parser.add_argument("--min_timestep", type=int, default=None)
    parser.add_argument("--max_timestep", type=int, default=None)
    parser.add_argument("--ip_noise_gamma", type=float, default=None)
    parser.add_argument("--ip_noise_gamma_random_strength", action="store_true")
''' + _READ_CONFIG + '''
def verify_training_args(args):
    pass

def get_sai_model_spec(state_dict, args, sdxl, lora, textual_inversion, **kw):
    return {"modelspec.architecture": "fake"}

def conditional_loss(model_pred, target, loss_type, reduction, huber_c=None):
    return torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)

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

SD_CUSTOM = '''
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

SD_FLUX = '''
import torch

def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype):
    t = torch.rand(latents.shape[0], device=device)
    sigmas = t.view(-1, 1, 1, 1)
    return (sigmas * noise + (1.0 - sigmas) * latents).to(dtype), t * 1000, sigmas
'''

#: musubi-tuner's (v0.3.4) patched functions, in their shape.
MUSUBI_PARSER_COMMON = '''
import argparse

def _add_training_args(parser):
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--config_file", type=str, default=None)
    parser.add_argument("--no_metadata", action="store_true")

def setup_parser_common():
    parser = argparse.ArgumentParser()
    _add_training_args(parser)
    return parser
''' + _READ_CONFIG

MUSUBI_TRAINER_BASE = '''
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

MUSUBI_SAI = '''
def build_metadata(state_dict, architecture, timestamp, title=None, is_lora=True):
    return {"modelspec.architecture": architecture}
'''

MUSUBI_CONFIG_UTILS = '''
class BlueprintGenerator:
    def generate(self, user_config, argparse_namespace, **runtime_params):
        return "blueprint"
'''

MUSUBI_FULL_TRAIN = '''
import torch

class {cls}:
    def train(self, args, latents, accelerator):
        noise = torch.randn_like(latents)
        accelerator.backward(torch.zeros(()))
        return noise
'''

#: hv_train.py (HunyuanVideo full fine-tune): its own parser and config reader (hv_train.py:1194, 1678).
MUSUBI_HV_TRAIN = '''
import argparse

def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file", type=str, default=None)
    parser.add_argument("--no_metadata", action="store_true")
    return parser
''' + _READ_CONFIG + MUSUBI_FULL_TRAIN.format(cls="FineTuningTrainer")


class DDPMScheduler:
    """``add_noise`` of a DDPM schedule (stand-in for diffusers' DDPMScheduler)."""

    def __init__(self):
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def add_noise(self, x, noise, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise


def selected_noise(latents, k, seed, rank=None, **kw):
    """What selection returns for ``latents`` when the host's own draw follows ``torch.manual_seed(seed)``:
    the host draws its stock noise first and the selection is seeded from that draw (with ``rank``
    mixed in under multi-process training), so it consumes none of the host's random numbers."""
    torch.manual_seed(seed)
    seed = seed_from_draw(torch.randn_like(latents))
    if rank is not None:
        seed = immiscible.derive_seed(seed, rank)
    return immiscible.select_noise(latents, k, seed=seed, **kw)


def nan_latents(latents):
    bad = latents.clone()
    bad.view(-1)[0] = float("nan")
    return bad


class FakeHost:
    """One fake host program in a folder, imported through its adapter's hook, and how to drive it.

    Subclasses give: ``name`` (the fixture id), ``adapter``, ``files`` (path -> text), ``packages``
    (top-level names to purge), ``modules`` (short name -> import name), ``script`` (the trainer
    that runs), ``noise_point`` (the point that trainer draws through), ``latents``,
    ``unimported_script`` (a known trainer whose noise point's module the fake does not have, and
    that point), ``metadata_drift`` (a file and its text where the metadata function lost its
    required parameter) and ``base_metadata``.
    """

    name = adapter = files = packages = modules = script = noise_point = latents = None
    unimported_script = metadata_drift = base_metadata = None

    def __init__(self, tmp_path, monkeypatch):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.mods: dict = {}
        self.accelerate = None

    @property
    def host(self):
        return self.adapter.host

    @property
    def runtime(self):
        return self.adapter.runtime

    def purge(self) -> None:
        for name in [m for m in sys.modules if m.split(".")[0] in self.packages]:
            del sys.modules[name]

    def build(self, files=None, script=None):
        """Write the fake (``files``: path -> text replacing the default), import it through the hook."""
        for rel, text in {**self.files, **(files or {})}.items():
            path = self.tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.purge()
        importlib.invalidate_caches()
        self.runtime.reset()
        self.runtime.points.clear()
        self.adapter.script = script or self.script
        self.adapter.hook.install()
        self.mods = {short: importlib.import_module(name) for short, name in self.modules.items()}
        self.accelerate = importlib.import_module("accelerate")
        return self

    # ------------------------------------------------------------------ driving it, like its trainers do

    def parse(self, *argv):
        """The trainer's ``main()``: its parser, ``parse_args``, then ``read_config_from_file`` (start-up)."""
        self.monkeypatch.setattr(sys, "argv", [self.adapter.script or self.script, *argv])
        parser = self.parser()
        return self.read_config(parser.parse_args(), parser)

    def accelerator(self):
        return self.accelerate.Accelerator()

    def step(self, args, latents=None, seed=0, acc=None):
        """One training step, after ``torch.manual_seed(seed)``: the trainer's draw, then ``accelerator.backward``.
        Returns ``(the latents the noise is for, the noise)``."""
        raise NotImplementedError

    def stock(self, args, latents=None, seed=0):
        """The host's own code without the adapter: ``(noise, torch RNG state after, random state after)``."""
        raise NotImplementedError

    def start_up_point(self, args):
        """The table's ``START_UP`` point: a call every run makes with its namespace before a model loads."""
        raise NotImplementedError

    def metadata(self, args):
        """A saved model's metadata, as the trainer asks for it."""
        raise NotImplementedError


class SdScripts(FakeHost):
    name = "sd-scripts"
    packages = ("library", "accelerate")
    files = {"library/__init__.py": "", "library/train_util.py": SD_TRAIN_UTIL,
             "library/custom_train_functions.py": SD_CUSTOM, "library/flux_train_utils.py": SD_FLUX,
             "accelerate/__init__.py": FAKE_ACCELERATE}
    modules = {"train_util": "library.train_util", "flux": "library.flux_train_utils",
               "custom": "library.custom_train_functions"}
    script = "train_network.py"
    noise_point = "train_util.get_noise_noisy_latents_and_timesteps"
    unimported_script = ("sd3_train_network.py", "sd3_train_utils.get_noisy_model_input_and_timesteps")
    metadata_drift = ("library/train_util.py", SD_TRAIN_UTIL.replace("def get_sai_model_spec(state_dict, args,",
                                                                     "def get_sai_model_spec(state_dict, arguments,"))
    base_metadata = {"modelspec.architecture": "fake"}
    adapter = KOHYA_ADAPTER

    @property
    def latents(self):
        return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(123))

    def parser(self):
        parser = argparse.ArgumentParser()
        self.mods["train_util"].add_training_arguments(parser, True)
        return parser

    def read_config(self, args, parser):
        return self.mods["train_util"].read_config_from_file(args, parser)

    def noise_call(self, args, latents, seed=0, fn=None):
        """``get_noise_noisy_latents_and_timesteps`` after seeding torch and ``random``: (noise, noisy, timesteps)."""
        torch.manual_seed(seed)
        random.seed(seed)
        return (fn or self.mods["train_util"].get_noise_noisy_latents_and_timesteps)(args, DDPMScheduler(), latents)

    def step(self, args, latents=None, seed=0, acc=None):
        latents = self.latents if latents is None else latents
        acc = acc or self.accelerator()
        noise = self.noise_call(args, latents, seed)[0]
        acc.backward(torch.zeros(()))
        return latents, noise

    def stock(self, args, latents=None, seed=0):
        latents = self.latents if latents is None else latents
        fn = self.mods["train_util"].get_noise_noisy_latents_and_timesteps.__wrapped__
        noise = self.noise_call(args, latents, seed, fn)[0]
        return noise, torch.get_rng_state(), random.getstate()

    def start_up_point(self, args):
        return self.mods["train_util"].verify_training_args(args)

    def metadata(self, args):
        return self.mods["train_util"].get_sai_model_spec(None, args, False, True, False)


class MusubiTuner(FakeHost):
    name = "musubi-tuner"
    packages = ("musubi_tuner", "accelerate")
    files = {"musubi_tuner/__init__.py": "", "musubi_tuner/training/__init__.py": "",
             "musubi_tuner/training/parser_common.py": MUSUBI_PARSER_COMMON,
             "musubi_tuner/training/trainer_base.py": MUSUBI_TRAINER_BASE,
             "musubi_tuner/utils/__init__.py": "", "musubi_tuner/utils/sai_model_spec.py": MUSUBI_SAI,
             "musubi_tuner/dataset/__init__.py": "", "musubi_tuner/dataset/config_utils.py": MUSUBI_CONFIG_UTILS,
             "musubi_tuner/zimage_train.py": MUSUBI_FULL_TRAIN.format(cls="ZImageTrainer"),
             "musubi_tuner/hv_train.py": MUSUBI_HV_TRAIN,
             "accelerate/__init__.py": FAKE_ACCELERATE}
    modules = {"parser_common": "musubi_tuner.training.parser_common",
               "trainer_base": "musubi_tuner.training.trainer_base",
               "sai_model_spec": "musubi_tuner.utils.sai_model_spec",
               "config_utils": "musubi_tuner.dataset.config_utils",
               "zimage_train": "musubi_tuner.zimage_train", "hv_train": "musubi_tuner.hv_train"}
    script = "wan_train_network.py"
    noise_point = "trainer_base.NetworkTrainer._run_training_loop (inline noise)"
    unimported_script = ("qwen_image_train.py", "qwen_image_train.QwenImageTrainer.train (inline noise)")
    metadata_drift = ("musubi_tuner/utils/sai_model_spec.py",
                      MUSUBI_SAI.replace("(state_dict, architecture,", "(state_dict, arch,").replace(": architecture}",
                                                                                                 ": arch}"))
    base_metadata = {"modelspec.architecture": "wan"}
    adapter = MUSUBI_ADAPTER

    @property
    def latents(self):
        return torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))  # [B, C, F, H, W]

    def parser(self):
        return self.mods["parser_common"].setup_parser_common()

    def read_config(self, args, parser):
        return self.mods["parser_common"].read_config_from_file(args, parser)

    def loop(self, args, batches, seed=0, acc=None, trainer_base=None):
        """``NetworkTrainer._run_training_loop`` over ``batches`` after ``torch.manual_seed(seed)``:
        per batch ``(latents, noise, model_input, target)``."""
        torch.manual_seed(seed)
        trainer = (trainer_base or self.mods["trainer_base"]).NetworkTrainer()
        return trainer._run_training_loop(args, batches, acc or self.accelerator())

    def step(self, args, latents=None, seed=0, acc=None):
        latents = self.latents if latents is None else latents
        (seen, noise, _, _), = self.loop(args, [latents], seed, acc)
        return seen, noise

    def stock(self, args, latents=None, seed=0):
        """The loop's code run from a copy the adapter does not know (another file name)."""
        latents = self.latents if latents is None else latents
        copy = types.ModuleType("stock_trainer_base")
        exec(compile(MUSUBI_TRAINER_BASE, str(self.tmp_path / "stock_trainer_base.py"), "exec"), copy.__dict__)
        acc = types.SimpleNamespace(backward=lambda loss: None)
        (_, noise, _, _), = self.loop(args, [latents], seed, acc, trainer_base=copy)
        return noise, torch.get_rng_state(), random.getstate()

    def start_up_point(self, args):
        return self.mods["config_utils"].BlueprintGenerator().generate({}, args)

    def metadata(self, args):
        return self.mods["sai_model_spec"].build_metadata(None, "wan", 0.0)


FAKE_HOSTS = {h.name: h for h in (SdScripts, MusubiTuner)}


@contextlib.contextmanager
def fake_host(name, tmp_path, monkeypatch, **build):
    """Host ``name``'s fake built in ``tmp_path`` and imported through its hook; afterwards the
    hook, the runtime, ``torch.randn_like`` and ``sys.modules`` are as they were."""
    h = FAKE_HOSTS[name](tmp_path, monkeypatch)
    saved = {m: sys.modules[m] for m in list(sys.modules) if m.split(".")[0] in h.packages}
    functions = dict(_randn_like._functions)
    original = torch.randn_like
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(h.adapter, "script", h.adapter.script)
    try:
        yield h.build(**build)
    finally:
        h.adapter.hook.uninstall()
        h.runtime.reset()
        h.runtime.points.clear()
        torch.randn_like = original
        _randn_like._functions.clear()
        _randn_like._functions.update(functions)
        h.purge()
        sys.modules.update(saved)
