"""Train LoRA (Immiscible) on a real ComfyUI, over HTTP, on the CPU, with the random SD1.5 checkpoint.

Needs ``COMFYUI_DIR`` (skipped without it), ComfyUI's python (``IMMISCIBLE_VENV``) and the random
checkpoint (see ``test_comfyui.py``, whose ``Comfy`` client this reuses). A graph loads two tiny
captioned images (Load Image and Text Dataset from Folder), encodes them, trains 2 steps and saves
the LoRA.

ComfyUI's Train LoRA is not reproducible across prompts inside one server (its LoRA initialisation
draws from the global generator, which the previous prompt's last noise draw left somewhere), nor
on a fresh server's first prompt (measured here at a125cd84: two fresh servers' first stock prompts
part after the first optimizer step). So each arm runs in a **fresh server** whose first prompt
(W) draws RandomNoise's noise (``comfy.sample.prepare_noise`` reseeds the global generator), then
the same prompts in the same order:

====== === ============ ====================== ============
server     prompt 1     prompt 2               prompt 3
====== === ============ ====================== ============
A      W   stock, s1    stock, s2              stock, s3
B      W   stock, s1    k=8, s2 (+ bad inputs)  stock, s3
C      W   k=1, s1      k=8, s2                stock, s3
====== === ============ ====================== ============

A1 == B1 shows stock == stock in fresh servers; C1 == A1 is k = 1 == stock bit for bit; B2 == C2
is a k = 8 run reproduced, B2 != A2 that selection changed the training; B3 == C3 == A3 is a stock
prompt after an immiscible one trained exactly as stock (which also needs the k = 8 prompt to
leave torch's global generator where stock leaves it).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

if not os.environ.get("COMFYUI_DIR"):
    pytest.skip("COMFYUI_DIR is not set (a ComfyUI checkout; see docs/comfyui.md)", allow_module_level=True)

from test_comfyui import REPO, Comfy, _checkpoint, _png_size, _write_png, comfy_server, ui_to_api  # noqa: E402

COMFYUI_DIR = Path(os.environ["COMFYUI_DIR"])
SEEDS = (11, 22, 33)
#: W: RandomNoise's draw, which reseeds torch's global generator (comfy.sample.prepare_noise).
WARM_UP = {"1": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
           "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
           "3": {"class_type": "ImmiscibleTestDraw", "inputs": {"noise": ["1", 0], "latent": ["2", 0]}}}

#: Test-only nodes (written into each server's temporary custom_nodes, never shipped): what a
#: LORA_MODEL, LOSS_MAP and STRING hold, as the prompt's UI output (the tensors as a SHA-256), and a
#: noise draw the way SamplerCustomAdvanced makes it (the warm-up W).
REPORT_NODE = """
import hashlib
import json


class ImmiscibleTestTrainReport:
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "testing", "report", (), True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": ("LORA_MODEL",), "loss": ("LOSS_MAP",)},
                "optional": {"selection": ("LOSS_MAP",), "summary": ("STRING", {"forceInput": True})}}

    def report(self, lora, loss, selection=None, summary=None):
        digest = hashlib.sha256()
        for key in sorted(lora):
            digest.update(key.encode())
            digest.update(lora[key].detach().cpu().float().contiguous().numpy().tobytes())
        out = {"lora": digest.hexdigest(), "tensors": len(lora), "loss": loss["loss"],
               "selection": selection, "summary": summary, "metadata": getattr(lora, "metadata", None)}
        return {"ui": {"report": [json.dumps(out)]}}


class ImmiscibleTestDraw:
    CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "testing", "draw", (), True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"noise": ("NOISE",), "latent": ("LATENT",)}}

    def draw(self, noise, latent):
        return {"ui": {"drawn": [float(noise.generate_noise(latent).sum())]}}


NODE_CLASS_MAPPINGS = {"ImmiscibleTestTrainReport": ImmiscibleTestTrainReport, "ImmiscibleTestDraw": ImmiscibleTestDraw}
"""


@contextlib.contextmanager
def fresh_server(root: Path, dataset: Path, ckpt: Path):
    """A new ComfyUI process (so a fresh global generator) with the pack, the report node, the
    checkpoint and the shared ``dataset`` input folder."""
    for d in ("output", "temp", "user", "frontend", "custom_nodes/immiscible_test_train", "models/checkpoints",
              "models/loras"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "custom_nodes" / "immiscible_diffusion").symlink_to(REPO, target_is_directory=True)
    (root / "custom_nodes" / "immiscible_test_train" / "__init__.py").write_text(REPORT_NODE)
    (root / "models/checkpoints" / ckpt.name).symlink_to(ckpt)
    (root / "extra_model_paths.yaml").write_text(
        f"immiscible_test:\n    base_path: {root}\n    custom_nodes: custom_nodes\n"
        f"    checkpoints: models/checkpoints\n    loras: models/loras\n")
    with comfy_server(root, dataset, "/object_info/TrainLoraImmiscible") as server:
        yield server


def train_graph(ckpt: str, seed: int, k: int | None, prefix: str, coarse: int = 0, plot: bool = False) -> dict:
    """Checkpoint -> dataset (images + captions) -> VAE Encode -> Train LoRA (stock when ``k`` is None,
    else Immiscible) -> save + report."""
    stock = {"model": ["1", 0], "latents": ["3", 0], "positive": ["2", 1], "batch_size": 1,
             "grad_accumulation_steps": 2, "steps": 2, "learning_rate": 0.001, "rank": 2, "optimizer": "AdamW",
             "loss_function": "MSE", "seed": seed, "training_dtype": "fp32", "lora_dtype": "fp32",
             "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]"}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImageTextSetFromFolderNode",
              "inputs": {"folder": "train", "clip": ["1", 1], "resize_method": "None", "width": -1, "height": -1}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
    }
    if k is None:
        graph["4"] = {"class_type": "TrainLoraNode", "inputs": stock}
        graph["5"] = {"class_type": "SaveLoRANode", "inputs": {"lora": ["4", 1], "prefix": prefix, "steps": ["4", 3]}}
        graph["6"] = {"class_type": "ImmiscibleTestTrainReport", "inputs": {"lora": ["4", 1], "loss": ["4", 2]}}
        return graph
    graph["4"] = {"class_type": "TrainLoraImmiscible",
                  "inputs": {**stock, "k": k, "mode": "knn", "metric": "l2", "coarse": coarse}}
    graph["5"] = {"class_type": "SaveLoraImmiscible", "inputs": {"lora": ["4", 1], "prefix": prefix, "steps": ["4", 3]}}
    graph["6"] = {"class_type": "ImmiscibleTestTrainReport",
                  "inputs": {"lora": ["4", 1], "loss": ["4", 2], "selection": ["4", 4], "summary": ["4", 5]}}
    if plot:
        graph["7"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["4", 4], "filename_prefix": "selection"}}
    return graph


def report(outputs: dict) -> dict:
    return json.loads(outputs["6"]["report"][0])


def saved_metadata(path: Path) -> dict:
    """A safetensors file's ``__metadata__`` (its JSON header; no safetensors import needed)."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


def _dataset(root: Path) -> Path:
    """Two 64 px captioned images in ``root/train`` (the integration cache's, else drawn here)."""
    train = root / "train"
    train.mkdir(parents=True)
    cache = Path(os.environ.get("IMMISCIBLE_CACHE", "/work/ext/cache")) / "train_images"
    for i in range(2):
        name = f"{i:03d}"
        if (cache / f"{name}.png").is_file():
            shutil.copy(cache / f"{name}.png", train / f"{name}.png")
        else:
            _write_png(train / f"{name}.png")
        (train / f"{name}.txt").write_text(f"a test picture number {i}")
    return root


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """Servers A, B and C of the module docstring: each prompt's report, and B's extra checks."""
    if not (COMFYUI_DIR / "comfy_extras" / "nodes_train.py").is_file():
        pytest.skip(f"{COMFYUI_DIR} has no comfy_extras/nodes_train.py (Train LoRA)")
    ckpt = _checkpoint()
    if ckpt is None:
        pytest.skip("no random SD1.5 checkpoint (set IMMISCIBLE_CKPT or run scripts/setup_integration.sh)")
    if shutil.which("flock") is None:
        pytest.skip("flock(1) is needed to serialise heavy runs")
    base = tmp_path_factory.mktemp("comfy_train")
    dataset = _dataset(base / "input")
    plans = {"A": (None, None, None), "B": (None, 8, None), "C": (1, 8, None)}  # k per prompt; None: stock
    out = {"times": {}}
    for name, ks in plans.items():
        t0 = time.time()
        with fresh_server(base / name, dataset, ckpt) as server:
            server.run(WARM_UP)
            for i, (k, seed) in enumerate(zip(ks, SEEDS), start=1):
                if name == "B" and i == 3:
                    out["bad"] = bad_inputs(server, ckpt.name)
                outputs = server.run(train_graph(ckpt.name, seed, k, f"loras/{name}{i}", plot=k == 8))
                rep = report(outputs)
                if "5" in outputs and outputs["5"].get("loras"):
                    item = outputs["5"]["loras"][0]
                    rep["file"] = str(server.output_file(item))
                else:
                    rep["file"] = str(next((server.root / "output" / "loras").glob(f"{name}{i}_*.safetensors")))
                if "7" in outputs:
                    rep["plot"] = _png_size(server.view(outputs["7"]["images"][0]))
                out[f"{name}{i}"] = rep
            out["log"] = server.log()
        out["times"][name] = time.time() - t0
    print("server wall times (s):", {k: round(v, 1) for k, v in out["times"].items()})
    return out


def bad_inputs(server: Comfy, ckpt: str) -> dict:
    """k out of range (refused at queue time), coarse larger than the 8 x 8 latent (fails before any
    training), then a stock-inputs question the server must still answer."""
    k0 = server.refusal(train_graph(ckpt, SEEDS[1], 0, "loras/bad_k"))
    coarse = server.refusal(train_graph(ckpt, SEEDS[1], 8, "loras/bad_coarse", coarse=64))
    info = json.loads(server.get("/object_info/TrainLoraImmiscible"))["TrainLoraImmiscible"]
    return {"k0": k0, "coarse": coarse, "info": info}


def test_stock_is_stock_in_fresh_servers(arms):
    assert arms["A1"]["lora"] == arms["B1"]["lora"] and arms["A1"]["loss"] == arms["B1"]["loss"]
    assert arms["A1"]["lora"] != arms["A2"]["lora"]  # the seed matters: a comparison can fail


def test_k1_is_the_stock_node_bit_for_bit(arms):
    assert arms["C1"]["lora"] == arms["A1"]["lora"]
    assert arms["C1"]["loss"] == arms["A1"]["loss"]
    assert arms["C1"]["metadata"] == {} and saved_metadata(Path(arms["C1"]["file"])) == {}
    assert "k=1: stock noise" in arms["C1"]["summary"]


def test_k8_trains_selected_saves_metadata_and_reproduces(arms):
    b2, c2 = arms["B2"], arms["C2"]
    assert len(b2["loss"]) == 2 * 2  # one value per micro-step: steps x grad_accumulation_steps
    sel = b2["selection"]
    assert sel["statistic"] == "reduction" and len(sel["loss"]) == 4 and sel["stock_steps"] == []
    assert all(0.0 < r < 1.0 for r in sel["loss"]), sel  # every micro-step was selected (k = 8: a reduction)
    assert "selected 4 of 4 micro-steps" in b2["summary"] and "stock steps 0" in b2["summary"]
    meta = saved_metadata(Path(b2["file"]))
    assert meta["ss_immiscible_k"] == "8" and meta["ss_immiscible_mode"] == "knn"
    assert meta["ss_immiscible_stock_batches"] == "0"
    assert Path(b2["file"]).name.startswith("B2_2_steps_")  # SaveLoRA's naming
    assert b2["plot"][0] > 100  # Plot Loss Graph drew the selection statistic
    assert b2["lora"] == c2["lora"] and b2["loss"] == c2["loss"]  # same inputs and seed: same LoRA
    assert b2["lora"] != arms["A2"]["lora"]  # and selection changed it


def test_a_stock_prompt_after_an_immiscible_one_is_stock(arms):
    assert arms["B3"]["lora"] == arms["A3"]["lora"] and arms["B3"]["loss"] == arms["A3"]["loss"]
    assert arms["C3"]["lora"] == arms["A3"]["lora"] and arms["C3"]["loss"] == arms["A3"]["loss"]


def test_bad_inputs_get_a_clear_error_and_the_server_goes_on(arms):
    kind, text = arms["bad"]["k0"]
    assert kind == "refused" and "k must be in [1, 65536]" in text
    kind, text = arms["bad"]["coarse"]
    assert "coarse" in text and "64" in text, text
    assert "B3" in arms  # the next prompt ran
    info = arms["bad"]["info"]
    required = info["input"]["required"]
    assert info["category"] == "training/immiscible" and "optimizer" in required and "k" in required
    assert info["output"] == ["MODEL", "LORA_MODEL", "LOSS_MAP", "INT", "LOSS_MAP", "STRING"]


def test_example_workflow_runs(tmp_path):
    """The shipped training workflow converts to a prompt this ComfyUI accepts and runs."""
    ckpt = _checkpoint()
    if ckpt is None:
        pytest.skip("no random SD1.5 checkpoint")
    dataset = _dataset(tmp_path / "input")
    workflow = json.loads((REPO / "example_workflows" / "immiscible_train_lora.json").read_text())
    with fresh_server(tmp_path / "srv", dataset, ckpt) as server:
        server.run(WARM_UP)
        object_info = json.loads(server.get("/object_info"))
        overrides = {"CheckpointLoaderSimple": {"ckpt_name": ckpt.name},
                     "LoadImageTextSetFromFolderNode": {"folder": "train"},
                     # 2 steps: Plot Loss Graph divides by (max - min), so it needs two different values
                     "TrainLoraImmiscible": {"steps": 2, "training_dtype": "fp32", "lora_dtype": "fp32",
                                             "gradient_checkpointing": False}}
        outputs = server.run(ui_to_api(workflow, object_info, overrides))
        saved = [item for out in outputs.values() for item in out.get("loras", [])]
        assert saved and saved[0]["metadata"]["ss_immiscible_k"] == "8"
