"""ComfyUI V3 nodes: Train LoRA (Immiscible) and Save LoRA Weights (Immiscible).

Thin: the inputs are ComfyUI's own ``TrainLoraNode.INPUT_TYPES()`` / ``SaveLoRA.INPUT_TYPES()``, read
each time the schema is built (so a newer ComfyUI's inputs follow), plus ``k``, ``mode``, ``metric``
and ``coarse``; the training is the stock node's own ``train`` with only the training call's noise
selected (``comfy_nodes.training``). On a ComfyUI without ``comfy_extras/nodes_train.py``, or whose
``TrainSampler`` draws its noise another way, the node is listed but refused at queue time with the
reason and the ComfyUI version.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import immiscible
from comfy_api.latest import io

from .nodes import _coarse_input, _k_input, _metric_input, _mode_input
from .train_support import checkout_version, training_support
from .training import TrainedLoRA, TrainingRun, check_settings, selected_training_noise, spec_problems

CATEGORY = "training/immiscible"


def _comfy_version() -> str:
    import folder_paths  # at the root of the running ComfyUI, beside comfyui_version.py

    return checkout_version(Path(folder_paths.__file__).parent)


def stock_training():
    """``(nodes_train, nodes_custom_sampler, None)`` when this ComfyUI trains the way the node expects,
    else ``(None, None, why)``."""
    try:
        import comfy_extras.nodes_custom_sampler as custom_sampler
        import comfy_extras.nodes_train as nodes_train
    except ImportError:
        return None, None, training_support(None, _comfy_version())
    try:
        source = inspect.getsource(nodes_train)
    except (OSError, TypeError):
        source = ""
    why = training_support(source, _comfy_version())
    return (None, None, why) if why else (nodes_train, custom_sampler, None)


def _v3_input(name: str, spec: tuple, optional: bool):
    """A V3 input that lists exactly as the V1 ``(type, options)`` spec does."""
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    tooltip = opts.pop("tooltip", None)
    if isinstance(kind, (list, tuple)):
        return io.Combo.Input(name, options=list(kind), default=opts.get("default"), tooltip=tooltip,
                              optional=optional)
    return io.Custom(kind).Input(name, tooltip=tooltip, optional=optional, extra_dict=opts)


def derived_inputs(input_types: dict) -> list:
    return [_v3_input(name, spec, section == "optional")
            for section in ("required", "optional") for name, spec in input_types.get(section, {}).items()]


def _stock_inputs(node_cls) -> dict:
    return node_cls.INPUT_TYPES() if node_cls is not None else {}


class TrainLoraImmiscible(io.ComfyNode):
    """ComfyUI's Train LoRA with each training step's base noise selected near its latents."""

    @classmethod
    def define_schema(cls):
        nodes_train, _, why = stock_training()
        stock = _stock_inputs(nodes_train and nodes_train.TrainLoraNode)
        return io.Schema(
            node_id="TrainLoraImmiscible",
            display_name="Train LoRA (Immiscible)",
            category=CATEGORY,
            description="ComfyUI's own Train LoRA (same inputs, optimizers, resume, progress bar), except that each "
                        "training step's noise is the nearest of k Gaussian candidates to the step's latents "
                        "(Immiscible Diffusion). k = 1 is the stock node, bit for bit."
                        + (f" Not available here: {why}" if why else ""),
            inputs=[*derived_inputs(stock), _k_input(8), _mode_input(), _metric_input(), _coarse_input()],
            outputs=[
                io.Model.Output("model_with_lora", display_name="model_with_lora",
                                tooltip="The model with the trained LoRA applied."),
                io.LoraModel.Output("lora", display_name="lora",
                                    tooltip="The trained LoRA; Save LoRA Weights (Immiscible) writes it with its "
                                            "ss_immiscible_* metadata."),
                io.LossMap.Output("loss", display_name="loss",
                                  tooltip="The loss of every micro-step (steps x grad_accumulation_steps), as Train "
                                          "LoRA gives it."),
                io.Int.Output("total_steps", display_name="steps",
                              tooltip="Total training steps (existing LoRA's steps included)."),
                io.LossMap.Output("selection", display_name="selection",
                                  tooltip="The selection statistic of every micro-step: mean reduction "
                                          "1 - d(chosen)/mean d(candidates) (with coarse the pooled cosine; 0 at a "
                                          "stock step; at k = 1 the cosine of the stock noise). Plot Loss Graph "
                                          "draws it."),
                io.String.Output("summary", display_name="summary",
                                 tooltip="Steps, k, mode, mean statistic and stock steps of the run."),
            ],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, **inputs):
        """Queue-time check: this ComfyUI's training, the node's own inputs and the stock inputs' ranges."""
        nodes_train, _, why = stock_training()
        if why:
            return why
        problems = spec_problems(nodes_train.TrainLoraNode.INPUT_TYPES(), inputs)
        try:
            check_settings(inputs.get("k", 1), inputs.get("mode", "knn"), inputs.get("metric", "l2"),
                           inputs.get("coarse") or 0)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, k, mode="knn", metric="l2", coarse=0, **stock_inputs) -> io.NodeOutput:
        nodes_train, custom_sampler, why = stock_training()
        if why:
            raise RuntimeError(why)
        settings = check_settings(k, mode, metric, coarse or 0)
        latents = stock_inputs["latents"]["samples"]
        immiscible.check_coarse(settings.coarse, tuple(latents.shape), name="coarse")  # before any training
        run = TrainingRun(settings)
        node = nodes_train.TrainLoraNode()
        with selected_training_noise(nodes_train, custom_sampler, run):
            model, lora, loss, steps = getattr(node, node.FUNCTION)(**stock_inputs)
        summary = run.summary(stock_inputs["steps"], stock_inputs["grad_accumulation_steps"], _comfy_version())
        return io.NodeOutput(model, TrainedLoRA(lora, run.metadata()), loss, steps, run.selection_map(), summary)


class SaveLoraImmiscible(io.ComfyNode):
    """Save LoRA Weights, with the ``ss_immiscible_*`` metadata of a LoRA Train LoRA (Immiscible) made."""

    @classmethod
    def define_schema(cls):
        nodes_train, _, why = stock_training()
        return io.Schema(
            node_id="SaveLoraImmiscible",
            display_name="Save LoRA Weights (Immiscible)",
            category=CATEGORY,
            description="Save LoRA Weights (same file name and tensors), plus the ss_immiscible_* metadata keys the "
                        "sd-scripts adapter writes, for a LoRA trained by Train LoRA (Immiscible) with k > 1."
                        + (f" Not available here: {why}" if why else ""),
            inputs=derived_inputs(_stock_inputs(nodes_train and nodes_train.SaveLoRA)),
            is_output_node=True,
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, **inputs):
        _, _, why = stock_training()
        return why or True

    @classmethod
    def execute(cls, lora, prefix, steps=None) -> io.NodeOutput:
        import folder_paths
        import safetensors.torch

        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            prefix, folder_paths.get_output_directory())
        name = f"{filename}_{counter:05}_.safetensors" if steps is None else \
            f"{filename}_{steps}_steps_{counter:05}_.safetensors"  # SaveLoRA's own naming
        metadata = getattr(lora, "metadata", {}) or {}
        safetensors.torch.save_file(dict(lora), os.path.join(folder, name), metadata=metadata or None)
        return io.NodeOutput(ui={"loras": [{"filename": name, "subfolder": subfolder, "type": "output",
                                            "metadata": metadata}]})


NODES = [TrainLoraImmiscible, SaveLoraImmiscible]
__all__ = ["NODES", "stock_training"]
