"""End to end on a real ComfyUI: the server runs headless on the CPU with this pack loaded.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout; skipped without it) and a python that runs ComfyUI:
``IMMISCIBLE_VENV`` (default ``/work/ext/venv/bin/python``). The sampling test needs the random-weight
SD1.5 checkpoint: ``IMMISCIBLE_CKPT``, else ``$IMMISCIBLE_CACHE/sd15_random.safetensors``, else
``/work/ext/cache/sd15_random.safetensors`` (``scripts/setup_integration.sh`` builds it).

The server listens on 127.0.0.1 only and gets its own temporary input, output, temp, user and model
folders (the checkout is not written to); the pack is loaded through ``--extra-model-paths-config``
(``custom_nodes:``). It holds ``flock /tmp/immiscible-heavy.lock`` (``IMMISCIBLE_HEAVY_LOCK``) while it
runs, since with a model loaded it takes about 6.5 GB. ``IMMISCIBLE_ARTIFACTS=DIR`` keeps the images.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (a ComfyUI checkout; see docs/comfyui.md)", allow_module_level=True)
PYTHON = os.environ.get("IMMISCIBLE_VENV", "/work/ext/venv/bin/python")
LOCK = os.environ.get("IMMISCIBLE_HEAVY_LOCK", "/tmp/immiscible-heavy.lock")
START_TIMEOUT = float(os.environ.get("IMMISCIBLE_COMFY_START_TIMEOUT", "900"))
RUN_TIMEOUT = float(os.environ.get("IMMISCIBLE_COMFY_RUN_TIMEOUT", "600"))


def _checkpoint() -> Path | None:
    cache = os.environ.get("IMMISCIBLE_CACHE")
    for cand in (os.environ.get("IMMISCIBLE_CKPT"), cache and Path(cache) / "sd15_random.safetensors",
                 "/work/ext/cache/sd15_random.safetensors"):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


# --------------------------------------------------------------------------- .latent files (safetensors)

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def write_latent(path: Path, samples: np.ndarray) -> None:
    """A ComfyUI ``.latent`` file (what SaveLatent writes): ``latent_tensor`` in VAE space."""
    data = np.ascontiguousarray(samples, np.float32).tobytes()
    header = {"latent_tensor": {"dtype": "F32", "shape": list(samples.shape), "data_offsets": [0, len(data)]},
              "latent_format_version_0": {"dtype": "F32", "shape": [0], "data_offsets": [len(data), len(data)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def read_latent(path: Path) -> np.ndarray:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    entry = json.loads(blob[8 : 8 + n])["latent_tensor"]
    start, end = entry["data_offsets"]
    buf = blob[8 + n + start : 8 + n + end]
    if entry["dtype"] == "BF16":
        arr = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(buf, _DTYPES[entry["dtype"]]).astype(np.float32)
    return arr.reshape(entry["shape"])


def structured_latent(batch: int, channels: int, h: int, w: int, frames: int | None = None, seed: int = 0,
                      scale: float = 1.0) -> np.ndarray:
    """Smooth, image-like latents (blobs and gradients) with a little texture, ``scale`` in VAE units."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(batch):
        chans = []
        for _ in range(channels):
            cx, cy, r = rng.uniform(0.2, 0.8, 3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))
            grad = rng.normal() * (xx - 0.5) + rng.normal() * (yy - 0.5)
            chans.append(rng.normal() * 2 * blob + grad + 0.15 * rng.normal(size=(h, w)) + rng.normal() * 0.3)
        sample = np.stack(chans)
        if frames:
            sample = np.stack([sample + 0.1 * f for f in range(frames)], 1)
        out.append(sample)
    return (np.stack(out) * scale).astype(np.float32)


# --------------------------------------------------------------------------- the server

#: A test-only node pack (written into the server's temporary custom_nodes, never shipped):
#: ``ImmiscibleTestLatent`` builds any LATENT dict a third-party node could hand over (shape,
#: batch_index, noise_mask), and ``ImmiscibleTestNoise`` calls ``noise.generate_noise(latent)``
#: exactly as SamplerCustomAdvanced does, without a model, and returns the noise as a LATENT.
TEST_NODES = """
import json

import torch


class ImmiscibleTestLatent:
    CATEGORY, FUNCTION, RETURN_TYPES = "testing", "make", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"spec": ("STRING", {"default": "{}"})}}

    def make(self, spec):
        spec = json.loads(spec)
        gen = torch.Generator().manual_seed(spec.get("seed", 0))
        out = {"samples": torch.randn(spec["shape"], generator=gen) * spec.get("scale", 4.0) + 1.0}
        if spec.get("nan"):
            out["samples"].view(-1)[0] = float("nan")
        if "batch_index" in spec:
            out["batch_index"] = spec["batch_index"]
        if "noise_mask" in spec:
            out["noise_mask"] = torch.ones(spec["noise_mask"])
        return (out,)


class ImmiscibleTestNoise:
    CATEGORY, FUNCTION, RETURN_TYPES = "testing", "run", ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise": ("NOISE",), "latent": ("LATENT",)}}

    def run(self, noise, latent):
        return ({"samples": noise.generate_noise(latent)},)


NODE_CLASS_MAPPINGS = {"ImmiscibleTestLatent": ImmiscibleTestLatent, "ImmiscibleTestNoise": ImmiscibleTestNoise}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, url: str, root: Path):
        self.url, self.root = url, root

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def submit(self, graph: dict) -> tuple[str, object]:
        """Queue an API-format graph and wait: ``("ok", outputs)``, ``("refused", the /prompt answer)``
        when validation refused it, or ``("failed", the execution_error message)``."""
        body = json.dumps({"prompt": graph, "client_id": uuid.uuid4().hex}).encode()
        req = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                prompt_id = json.loads(r.read())["prompt_id"]
        except urllib.error.HTTPError as exc:
            return "refused", json.loads(exc.read().decode())
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            hist = json.loads(self.get(f"/history/{prompt_id}"))
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    return "failed", errors[0] if errors else status
                return "ok", entry["outputs"]
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s\n{self.log()}")

    def run(self, graph: dict) -> dict:
        """Queue an API-format graph and wait; returns the prompt's outputs from /history."""
        kind, result = self.submit(graph)
        if kind == "refused":
            raise AssertionError(f"/prompt refused the graph: {json.dumps(result)[:4000]}")
        if kind == "failed":
            raise AssertionError(f"prompt failed: {json.dumps(result)[:4000]}\n{self.log()}")
        return result

    def refusal(self, graph: dict) -> tuple[str, str]:
        """How a graph that must fail fails: ``("refused", the validation errors as text)`` at /prompt,
        or ``("failed", the exception message)`` when it ran; asserts that it did not succeed."""
        kind, result = self.submit(graph)
        assert kind != "ok", "the graph was expected to fail, and it ran"
        if kind == "refused":
            return kind, json.dumps(result.get("node_errors", result))
        return kind, f"{result.get('node_type')}: {result.get('exception_type')}: {result.get('exception_message')}"

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}")

    def output_file(self, item: dict) -> Path:
        return self.root / item.get("type", "output") / item.get("subfolder", "") / item["filename"]

    def log(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def comfy_server(root: Path, input_dir: Path, ready: str):
    """A ComfyUI process (under ``flock LOCK``) on a free port, with ``root``'s
    ``extra_model_paths.yaml``, ``input_dir`` as its input folder and its log in ``root/server.log``;
    yields its :class:`Comfy` client once ``GET ready`` answers, and stops the process group on exit."""
    port = _free_port()
    cmd = ["flock", LOCK, PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--front-end-root", str(root / "frontend"),
           "--extra-model-paths-config", str(root / "extra_model_paths.yaml"),
           "--database-url", f"sqlite:///{root / 'comfy.db'}", "--disable-api-nodes", "--disable-auto-launch",
           "--input-directory", str(input_dir), "--output-directory", str(root / "output"),
           "--temp-directory", str(root), "--user-directory", str(root / "user")]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Comfy(f"http://127.0.0.1:{port}", root)
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}\n{server.log()}")
            try:
                server.get(ready)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() - t0 > START_TIMEOUT:
                    raise RuntimeError(f"ComfyUI did not answer in {START_TIMEOUT} s\n{server.log()}")
                time.sleep(0.5)
        server.start_seconds = time.time() - t0
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of flock + ComfyUI started above
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    comfy_dir = Path(COMFYUI_DIR)
    if not (comfy_dir / "main.py").is_file():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no main.py")
    if not Path(PYTHON).exists():
        pytest.skip(f"no ComfyUI python at {PYTHON} (set IMMISCIBLE_VENV)")
    if shutil.which("flock") is None:
        pytest.skip("flock(1) is needed to serialise heavy runs")
    root = tmp_path_factory.mktemp("comfy")
    for d in ("input", "output", "temp", "user", "frontend", "custom_nodes", "models/checkpoints"):
        (root / d).mkdir(parents=True)
    (root / "custom_nodes" / "immiscible_diffusion").symlink_to(REPO, target_is_directory=True)
    (root / "custom_nodes" / "immiscible_test_nodes").mkdir()
    (root / "custom_nodes" / "immiscible_test_nodes" / "__init__.py").write_text(TEST_NODES)
    ckpt = _checkpoint()
    if ckpt is not None:
        (root / "models/checkpoints" / ckpt.name).symlink_to(ckpt)
    (root / "extra_model_paths.yaml").write_text(
        f"immiscible_test:\n    base_path: {root}\n    custom_nodes: custom_nodes\n"
        f"    checkpoints: models/checkpoints\n")
    try:
        with comfy_server(root, root / "input", "/object_info/ImmiscibleNoise") as server:
            server.checkpoint = ckpt
            yield server
    finally:
        artifacts = os.environ.get("IMMISCIBLE_ARTIFACTS")
        if artifacts:
            dest = Path(artifacts)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "server.log", dest / "server.log")
            for png in (root / "output").rglob("*.png"):
                shutil.copy(png, dest / png.name)


def _png_size(blob: bytes) -> tuple[int, int]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    w, h = struct.unpack(">II", blob[16:24])
    return w, h


# --------------------------------------------------------------------------- tests


def test_pack_is_loaded(comfy):
    info = json.loads(comfy.get("/object_info/ImmiscibleNoise"))["ImmiscibleNoise"]
    assert info["category"] == "sampling/noise/immiscible" and info["output"] == ["NOISE"]
    preview = json.loads(comfy.get("/object_info/ImmiscibleNoisePreview"))["ImmiscibleNoisePreview"]
    assert preview["output"] == ["IMAGE", "LATENT", "LATENT", "LATENT", "LATENT", "STRING"]
    seed = info["input"]["required"]["seed"][1]
    assert seed["max"] == 0xFFFFFFFFFFFFFFFF and seed["control_after_generate"]
    import immiscible

    k = info["input"]["required"]["k"][1]
    assert (k["min"], k["max"]) == (immiscible.K_MIN, immiscible.K_MAX)
    print(f"ComfyUI with the pack answered after {comfy.start_seconds:.1f} s")


def _preview_graph(source: dict, k=16, fmt="auto", t=0.5, prefix="immiscible_sheet", coarse=0):
    return {
        "1": source,
        "2": {"class_type": "ImmiscibleNoisePreview",
              "inputs": {"latent": ["1", 0], "k": k, "mode": "knn", "metric": "l2", "seed": 42, "t": t,
                         "latent_format": fmt, "coarse": coarse}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 1], "filename_prefix": f"latents/{prefix}_a"}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["2", 2], "filename_prefix": f"latents/{prefix}_r"}},
    }


def _check_preview(comfy, outputs, shape):
    images = outputs["3"]["images"]
    assert len(images) == 1 and images[0]["type"] == "temp"
    w, h = _png_size(comfy.view(images[0]))
    assert w >= 800 and h >= 500
    assigned = read_latent(comfy.output_file(outputs["5"]["latents"][0]))
    rand = read_latent(comfy.output_file(outputs["6"]["latents"][0]))
    assert assigned.shape == rand.shape == shape
    return assigned, rand


@pytest.mark.parametrize("node, channels", [("EmptyLatentImage", 4), ("EmptySD3LatentImage", 16)])
def test_preview_of_empty_latent(comfy, node, channels):
    src = {"class_type": node, "inputs": {"width": 64, "height": 64, "batch_size": 2}}
    assigned, rand = _check_preview(comfy, comfy.run(_preview_graph(src, prefix=f"empty{channels}")),
                                    (2, channels, 8, 8))
    np.testing.assert_array_equal(assigned, rand)  # all-zero latent: plain noise, as RandomNoise


@pytest.mark.parametrize("name, shape, fmt", [("sd15", (4, 4, 64, 64), "auto"), ("flux", (2, 16, 32, 32), "auto"),
                                              ("wan", (1, 16, 3, 16, 16), "wan")])
def test_preview_of_loaded_latent(comfy, name, shape, fmt):
    frames = shape[2] if len(shape) == 5 else None
    scale = {"sd15": 1 / 0.18215, "flux": 1 / 0.3611, "wan": 2.0}[name]
    latent = structured_latent(shape[0], shape[1], shape[-2], shape[-1], frames, seed=1, scale=scale)
    write_latent(comfy.root / "input" / f"{name}.latent", latent)
    src = {"class_type": "LoadLatent", "inputs": {"latent": f"{name}.latent"}}
    outputs = comfy.run(_preview_graph(src, k=64, fmt=fmt, prefix=f"sheet_{name}"))
    assigned, rand = _check_preview(comfy, outputs, shape)
    assert not np.array_equal(assigned, rand)
    text = comfy.log()
    assert "Traceback" not in text


def test_coarse_preview_over_http_is_the_core_coarse_selection(comfy):
    import torch

    import immiscible

    latent = structured_latent(2, 4, 32, 32, seed=4, scale=1 / 0.18215)
    write_latent(comfy.root / "input" / "coarse.latent", latent)
    src = {"class_type": "LoadLatent", "inputs": {"latent": "coarse.latent"}}
    coarse, _ = _check_preview(comfy, comfy.run(_preview_graph(src, k=32, coarse=4, prefix="coarse4")), (2, 4, 32, 32))
    plain, _ = _check_preview(comfy, comfy.run(_preview_graph(src, k=32, prefix="coarse0")), (2, 4, 32, 32))
    x = torch.from_numpy(np.asarray(latent, dtype=np.float32)) * 0.18215
    want = immiscible.select_noise(x, 32, seed=42, backend="torch", sample_ids=[0, 1], coarse=4) / 0.18215
    np.testing.assert_allclose(coarse, want.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(coarse, plain)
    with pytest.raises(AssertionError, match=r"coarse must be in \[0, 32\]"):  # bigger than the 32x32 latent
        comfy.run(_preview_graph(src, k=32, coarse=33, prefix="coarse33"))


def test_preview_respects_batch_index(comfy):
    """A latent taken out of a batch (LatentFromBatch sets batch_index) gets the noise it had in the batch."""
    write_latent(comfy.root / "input" / "batch4.latent", structured_latent(4, 4, 16, 16, seed=5, scale=1 / 0.18215))
    src = {"class_type": "LoadLatent", "inputs": {"latent": "batch4.latent"}}
    whole, _ = _check_preview(comfy, comfy.run(_preview_graph(src, prefix="batch_whole")), (4, 4, 16, 16))
    graph = _preview_graph({"class_type": "LatentFromBatch", "inputs": {"samples": ["0", 0], "batch_index": 2,
                                                                        "length": 2}}, prefix="batch_part")
    graph["0"] = src
    part, _ = _check_preview(comfy, comfy.run(graph), (2, 4, 16, 16))
    np.testing.assert_array_equal(part, whole[2:])


def _sampling_graph(latent_source: dict, noise: dict, prefix: str, ckpt: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red square", "clip": ["ckpt", 1]}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["ckpt", 0], "conditioning": ["pos", 0]}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler",
                   "inputs": {"model": ["ckpt", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}},
        "latent": latent_source,
        "noise": noise,
        "run": {"class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0],
                           "sigmas": ["sigmas", 0], "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": f"latents/{prefix}"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["run", 0], "vae": ["ckpt", 2]}},
        "image": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def test_sampling_with_immiscible_noise(comfy):
    if comfy.checkpoint is None:
        pytest.skip("no random SD1.5 checkpoint (set IMMISCIBLE_CKPT or run scripts/setup_integration.sh)")
    ckpt = comfy.checkpoint.name
    write_latent(comfy.root / "input" / "img.latent", structured_latent(2, 4, 8, 8, seed=3, scale=1 / 0.18215))
    loaded = {"class_type": "LoadLatent", "inputs": {"latent": "img.latent"}}
    empty = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    seed = 1234
    random_noise = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}

    def immiscible(k):
        return {"class_type": "ImmiscibleNoise", "inputs": {"seed": seed, "k": k, "mode": "knn", "metric": "l2",
                                                            "latent_format": "auto", "model": ["ckpt", 0]}}

    results, times = {}, {}
    for name, source, noise in [("rand_loaded", loaded, random_noise), ("imm_loaded", loaded, immiscible(16)),
                                ("rand_empty", empty, random_noise), ("imm_empty", empty, immiscible(16))]:
        t0 = time.time()
        outputs = comfy.run(_sampling_graph(source, noise, name, ckpt))
        times[name] = time.time() - t0
        results[name] = read_latent(comfy.output_file(outputs["save"]["latents"][0]))
        assert results[name].shape == ((2 if "loaded" in name else 1), 4, 8, 8) and np.isfinite(results[name]).all()
        assert _png_size(comfy.output_file(outputs["image"]["images"][0]).read_bytes()) == (64, 64)
    diff = float(np.abs(results["imm_loaded"] - results["rand_loaded"]).max())
    print(f"sampling times (s): {times}; max |immiscible - random| on a loaded latent: {diff:.4g}")
    assert diff > 1e-3, "k=16 immiscible noise gave the same result as RandomNoise"
    # all-zero latent: Immiscible Noise falls back to exactly RandomNoise's noise
    np.testing.assert_array_equal(results["imm_empty"], results["rand_empty"])


# --------------------------------------------------------------------------- hostile inputs over HTTP


def _test_latent(**spec) -> dict:
    return {"src": {"class_type": "ImmiscibleTestLatent", "inputs": {"spec": json.dumps(spec)}}}


def _node_graph(node: str, src: dict, **inputs) -> dict:
    """``src`` (nodes, the LATENT from ``"src"``) into Immiscible Noise Preview, or into Immiscible Noise
    whose ``generate_noise`` ImmiscibleTestNoise calls as SamplerCustomAdvanced does; the noise is saved."""
    graph = dict(src)
    settings = {"seed": 1, "k": 4, "mode": "knn", "metric": "l2", "latent_format": "auto", "coarse": 0}
    if node == "preview":
        graph["node"] = {"class_type": "ImmiscibleNoisePreview",
                         "inputs": {"latent": ["src", 0], "t": 0.5, **settings, **inputs}}
        noise = ["node", 1]
    else:
        graph["node"] = {"class_type": "ImmiscibleNoise", "inputs": {**settings, **inputs}}
        graph["draw"] = {"class_type": "ImmiscibleTestNoise", "inputs": {"noise": ["node", 0], "latent": ["src", 0]}}
        noise = ["draw", 0]
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": noise, "filename_prefix": f"latents/{node}"}}
    return graph


def _masked(shape) -> dict:
    """A loaded-like latent with a noise_mask, the stock way: SolidMask -> SetLatentNoiseMask."""
    src = _test_latent(shape=shape)
    src["raw"] = src.pop("src")
    src["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    src["src"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["raw", 0], "mask": ["mask", 0]}}
    return src


_FORMATS_EXPECT = "sd15 4, sdxl 4, sd3 16, flux 16, wan 16 (5-D video), raw any"
#: (case, latent source, node inputs, expected outcome for the preview, for Immiscible Noise). An
#: outcome is "ok" (the noise comes back in the latent's shape, finite) or (how it fails, texts the
#: message must hold): "refused" by /prompt at queue time, or "failed" when the node ran.
HOSTILE = [
    ("k_0", [1, 4, 8, 8], {"k": 0}, ("refused", ['"k"', "smaller than min of 1"]), None),
    ("k_over_K_MAX", [1, 4, 8, 8], {"k": 65537}, ("refused", ['"k"', "bigger than max of 65536"]), None),
    ("k_K_MAX", [2, 4, 8, 8], {"k": 65536}, "ok", None),
    ("coarse_bigger_than_latent", [1, 4, 8, 8], {"coarse": 9}, ("failed", ["coarse must be in [0, 8]"]), None),
    ("coarse_over_COARSE_MAX", [1, 4, 8, 8], {"coarse": 1025}, ("refused", ['"coarse"', "bigger than max"]), None),
    ("empty_batch", [0, 4, 8, 8], {}, ("failed", ["latent is empty", "(0, 4, 8, 8)"]), None),
    ("video_5d", [1, 16, 3, 8, 8], {}, "ok", None),
    ("video_5d_coarse", [2, 16, 3, 8, 8], {"coarse": 4}, "ok", None),
    ("noise_mask", "masked", {}, "ok", None),
    ("batch_index_longer", {"shape": [2, 4, 8, 8], "batch_index": [0, 1, 2]}, {},
     ("failed", ["latent['batch_index'] has 3 entries for a batch of 2"]), None),
    ("batch_index_shorter", {"shape": [2, 4, 8, 8], "batch_index": [5]}, {},
     ("failed", ["latent['batch_index'] has 1 entries for a batch of 2"]), None),
    ("seed_over_max", [1, 4, 8, 8], {"seed": 2**64}, ("refused", ['"seed"', "bigger than max"]), None),
    ("seed_negative", [1, 4, 8, 8], {"seed": -1}, ("refused", ['"seed"', "smaller than min of 0"]), None),
    ("mode_unknown", [1, 4, 8, 8], {"mode": "nope"}, ("refused", ["mode must be one of 'knn', 'assign', got 'nope'"]),
     None),
    ("metric_unknown", [1, 4, 8, 8], {"metric": "l1"}, ("refused", ["metric must be one of 'l2', 'cosine', got 'l1'"]),
     None),
    ("latent_format_unknown", [1, 4, 8, 8], {"latent_format": "sd9"},
     ("refused", ["latent_format must be one of 'auto', 'sd15', 'sdxl', 'sd3', 'flux', 'wan', 'raw', got 'sd9'"]),
     None),
    ("sd15_on_16_channels", [1, 16, 8, 8], {"latent_format": "sd15"},
     ("failed", ["latent_format 'sd15' expects 4-channel latents, but the latent has 16 channels", _FORMATS_EXPECT]),
     None),
    ("flux_on_4_channels", [2, 4, 8, 8], {"latent_format": "flux"},
     ("failed", ["latent_format 'flux' expects 16-channel latents, but the latent has 4 channels", _FORMATS_EXPECT]),
     None),
    ("wan_on_4d", [1, 16, 8, 8], {"latent_format": "wan"},
     ("failed", ["latent_format 'wan' expects 5-D video latents [B, C, T, H, W]", "(1, 16, 8, 8)"]), None),
    ("latent_3d", [2, 4, 16], {}, ("failed", ["the preview shows image latents", "(2, 4, 16)"]), "ok"),
    ("latent_nan", {"shape": [1, 4, 8, 8], "nan": True}, {}, ("failed", ["NaN or Inf"]), None),
    ("assign_cost_too_big", [64, 4, 2, 2], {"mode": "assign", "k": 65536},
     ("failed", ["batch size 64 and k=65536", "batch**2 * k must be at most", "mode='knn'"]), None),
    ("t_nan", [1, 4, 8, 8], {"t": float("nan")}, ("failed", ["t (noise level) must be a number in [0, 1], got nan"]),
     "skip"),
]


@pytest.mark.parametrize("node", ["preview", "noise"])
@pytest.mark.parametrize("case, latent, inputs, preview_expect, noise_expect", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input(comfy, node, case, latent, inputs, preview_expect, noise_expect):
    """Each input a user can send either works or fails naming the input, and the server answers the next prompt."""
    expect = preview_expect if node == "preview" or noise_expect is None else noise_expect
    if expect == "skip":
        pytest.skip(f"{case} is a preview input")
    spec = latent if isinstance(latent, dict) else {"shape": [2, 4, 8, 8] if latent == "masked" else latent}
    src = _masked(spec["shape"]) if latent == "masked" else _test_latent(**spec)
    graph = _node_graph(node, src, **inputs)
    if expect == "ok":
        outputs = comfy.run(graph)
        noise = read_latent(comfy.output_file(outputs["save"]["latents"][0]))
        assert list(noise.shape) == spec["shape"] and np.isfinite(noise).all()
        print(f"{node} {case}: ok, noise {noise.shape}")
    else:
        kind, text = comfy.refusal(graph)
        print(f"{node} {case}: {kind}: {text[:600]}")
        assert kind == expect[0], text
        for part in expect[1]:
            assert part in text, f"{part!r} not in {text}"
    # the server still answers
    outputs = comfy.run(_node_graph(node, _test_latent(shape=[1, 4, 8, 8])))
    assert outputs["save"]["latents"]


@pytest.mark.parametrize("with_model", [False, True])
def test_bad_choice_is_refused_before_the_checkpoint_loads(comfy, with_model):
    """A bad dropdown value on Immiscible Noise is refused when queued: without a model it failed inside
    SamplerCustomAdvanced after the checkpoint loaded, and with one it was silently ignored."""
    if comfy.checkpoint is None:
        pytest.skip("no random SD1.5 checkpoint (set IMMISCIBLE_CKPT or run scripts/setup_integration.sh)")
    noise = {"class_type": "ImmiscibleNoise", "inputs": {"seed": 1, "k": 4, "mode": "knn", "metric": "l2",
                                                         "latent_format": "sd9"}}
    if with_model:
        noise["inputs"]["model"] = ["ckpt", 0]
    write_latent(comfy.root / "input" / "refused.latent", structured_latent(1, 4, 8, 8, seed=3, scale=1 / 0.18215))
    loaded = {"class_type": "LoadLatent", "inputs": {"latent": "refused.latent"}}
    kind, text = comfy.refusal(_sampling_graph(loaded, noise, "refused", comfy.checkpoint.name))
    print(f"sampling graph with latent_format='sd9' (model connected: {with_model}): {kind}: {text[:600]}")
    assert kind == "refused" and "latent_format must be one of 'auto', 'sd15'" in text and "got 'sd9'" in text


def test_fallback_latent_formats_match_comfyui():
    """The channel counts and affine constants the nodes use without ComfyUI are ComfyUI's own."""
    from comfy_nodes import noise as cn

    code = ("import json, comfy.latent_formats as lf\n"
            "out = {}\n"
            "for name, cls in json.loads(__import__('sys').argv[1]).items():\n"
            "    c = getattr(lf, cls); f = c()\n"
            "    out[name] = [getattr(f, 'scale_factor', None), getattr(f, 'shift_factor', None), c.latent_channels,\n"
            "                 c.latent_dimensions]\n"
            "print(json.dumps(out))\n")
    res = subprocess.run([PYTHON, "-c", code, json.dumps(cn._COMFY_FORMAT_CLASSES)], cwd=COMFYUI_DIR,
                         capture_output=True, text=True, check=True)
    real = json.loads(res.stdout.strip().splitlines()[-1])
    for name, (scale, shift, channels, dims) in cn._AFFINE_FALLBACK.items():
        r_scale, r_shift, r_channels, r_dims = real[name]
        assert (channels, dims) == ((None if name == "raw" else r_channels), r_dims), name
        if name != "wan":  # Wan21's process_in is per-channel (mean, std), not affine
            assert (scale, shift) == pytest.approx((r_scale, r_shift or 0.0)), name
    assert cn.format_expectations().startswith(f"channels per latent_format: {_FORMATS_EXPECT}")


# --------------------------------------------------------------------------- example_workflows/ (UI format)

_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ui_to_api(workflow: dict, object_info: dict, overrides: dict) -> dict:
    """Convert a UI-format graph to API format the way the front end does (widgets in input order)."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        connected = {i["name"]: i["link"] for i in node["inputs"] if i.get("link") is not None}
        inputs = {name: [str(links[lid][1]), links[lid][2]] for name, lid in connected.items()}
        values = list(node.get("widgets_values", []))
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                if name in connected or not (isinstance(spec[0], list) or spec[0] in _WIDGET_TYPES):
                    continue
                opts = spec[1] if len(spec) > 1 else {}
                if not values:  # a workflow saved before this input existed: the front end keeps its default
                    inputs[name] = opts["default"]
                    continue
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or opts.get("image_upload"):
                    values.pop(0)
        assert not values, f"{node['type']}: {len(values)} widget values left over"
        inputs.update(overrides.get(node["type"], {}))
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def _write_png(path: Path, size: int = 64) -> None:
    import zlib

    yy, xx = np.mgrid[0:size, 0:size]
    rgb = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 128)], -1).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name", ["immiscible_noise_preview", "immiscible_noise_sampling"])
@pytest.mark.parametrize("saved", ["current", "before_coarse"])
def test_example_workflow_runs(comfy, name, saved):
    """The shipped workflows run; so do they as saved before the ``coarse`` input (one widget value fewer)."""
    if comfy.checkpoint is None:
        pytest.skip("no random SD1.5 checkpoint (set IMMISCIBLE_CKPT or run scripts/setup_integration.sh)")
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    if saved == "before_coarse":
        for node in workflow["nodes"]:
            if node["type"].startswith("Immiscible"):
                node["widgets_values"].pop()
    object_info = json.loads(comfy.get("/object_info"))
    _write_png(comfy.root / "input" / "example64.png")
    overrides = {"CheckpointLoaderSimple": {"ckpt_name": comfy.checkpoint.name},
                 "LoadImage": {"image": "example64.png"}, "BasicScheduler": {"steps": 2},
                 "ImmiscibleNoisePreview": {"k": 16}, "ImmiscibleNoise": {"k": 16}}
    outputs = comfy.run(ui_to_api(workflow, object_info, overrides))
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert images, f"{name} produced no image"
    for img in images:
        _png_size(comfy.view(img))
