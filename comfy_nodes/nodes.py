"""ComfyUI V3 nodes: Immiscible Noise (a NOISE source) and Immiscible Noise Preview.

Thin wrappers: the work is in ``comfy_nodes.noise`` and the pictures in ``comfy_nodes.viz``.
"""
from __future__ import annotations

import inspect

import immiscible
import torch
from comfy_api.latest import ComfyExtension, io

from .noise import FORMATS, MAX_SEED, Noise_Immiscible, preview, validate_choices

CATEGORY = "sampling/noise/immiscible"


def _advanced(input_cls, *args, **kwargs):
    """Build a widget input marked ``advanced=True`` where this ComfyUI supports the flag."""
    if "advanced" in inspect.signature(input_cls.__init__).parameters:
        kwargs["advanced"] = True
    return input_cls(*args, **kwargs)


def _seed_input():
    return io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                        tooltip="Seed of the candidate noise. The same seed, latent and settings give the same noise.")


def _k_input(default: int):
    return io.Int.Input("k", default=default, min=immiscible.K_MIN, max=immiscible.K_MAX,
                        tooltip="Candidates per sample (knn) or pool size per sample (assign). 1 = plain Gaussian "
                                "noise (knn). Released values: 64 for Stable Diffusion latents, 4 for flow "
                                "matching.")


def _mode_input():
    return _advanced(io.Combo.Input, "mode", options=list(immiscible.MODES), default="knn",
                     tooltip="knn: each sample keeps the nearest of its own k candidates (Improved Immiscible "
                             "Diffusion). assign: a linear assignment of the batch to a pool of k*B noises "
                             "(Immiscible Diffusion, needs scipy).")


def _metric_input():
    return _advanced(io.Combo.Input, "metric", options=list(immiscible.METRICS), default="l2",
                     tooltip="l2: nearest candidate (also favours slightly shorter noise). cosine: most aligned "
                             "candidate, keeping the noise norm exactly Gaussian.")


def _coarse_input():
    # Optional, so API-format graphs written before it still validate; 0 (off) when absent.
    return _advanced(io.Int.Input, "coarse", default=0, min=0, max=immiscible.COARSE_MAX, optional=True,
                     tooltip="Coarse selection: rank the candidates by their distance to the latent after both "
                             "are average-pooled to N x N, so only the layout (low frequencies) is aligned and the "
                             "fine detail stays ordinary noise. 0 = off. At most the latent's shorter side.")


def _model_input():
    return io.Model.Input("model", optional=True,
                          tooltip="Optional: the model whose latent format (process_in) defines the space where "
                                  "distances are measured. Without it, the latent_format choice is used.")


def _format_input():
    return _advanced(io.Combo.Input, "latent_format", options=list(FORMATS), default="auto",
                     tooltip="Latent space when no model is connected. auto: 4 channels = sd15, 16 channels = "
                             "flux (4-D) or wan (5-D), anything else raw (no conversion).")


class ImmiscibleNoise(io.ComfyNode):
    """A NOISE source for SamplerCustomAdvanced: noise chosen to lie near the input latent."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmiscibleNoise",
            display_name="Immiscible Noise",
            category=CATEGORY,
            description="Noise for SamplerCustomAdvanced that is picked, per sample, as the nearest of k Gaussian "
                        "candidates to the input latent (in model space). An all-zero latent gets plain noise, "
                        "identical to RandomNoise with the same seed.",
            # coarse last: saved workflows fill widgets by position, so older ones keep their values
            inputs=[_seed_input(), _k_input(64), _mode_input(), _metric_input(), _model_input(), _format_input(),
                    _coarse_input()],
            outputs=[io.Noise.Output(tooltip="Connect to SamplerCustomAdvanced's noise input.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, metric=None, latent_format=None):
        """Queue-time check of the dropdowns (ComfyUI does not check a V3 Combo's value)."""
        return validate_choices(mode, metric, latent_format)

    @classmethod
    def execute(cls, seed, k, mode="knn", metric="l2", model=None, latent_format="auto", coarse=0) -> io.NodeOutput:
        return io.NodeOutput(Noise_Immiscible(seed, k, mode, metric, model, latent_format, coarse))


class ImmiscibleNoisePreview(io.ComfyNode):
    """Assigned versus random noise for a latent: a picture, the noises as latents, and statistics."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ImmiscibleNoisePreview",
            display_name="Immiscible Noise Preview",
            category=CATEGORY,
            description="Shows what immiscible noise assignment does to this latent: random noise (RandomNoise, "
                        "same seed) against assigned noise, both noised at t, a pairing plot, the candidate "
                        "distances and a statistics table.",
            inputs=[
                io.Latent.Input("latent", tooltip="The latent to pair noise with (VAE space, as VAE Encode or "
                                                  "Load Latent give it). 4-D image or 5-D video latents."),
                _k_input(64),
                _mode_input(),
                _metric_input(),
                _seed_input(),
                io.Float.Input("t", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise level for the noised panels, 0 = clean, 1 = pure noise. Flow "
                                       "models: sigma*noise + (1-sigma)*x with sigma = t; EPS models: "
                                       "x + sigma*noise with sigma at timestep t*999."),
                _model_input(),
                _format_input(),
                _coarse_input(),  # last: older saved workflows keep their widget values
            ],
            outputs=[
                io.Image.Output("sheet", tooltip="The preview sheet (connect to Preview Image or Save Image)."),
                io.Latent.Output("assigned_noise", tooltip="The assigned noise, in VAE space (VAE Decode shows it)."),
                io.Latent.Output("random_noise", tooltip="RandomNoise's noise for the same seed, in VAE space."),
                io.Latent.Output("noisy_assigned", tooltip="The latent noised at t with the assigned noise, VAE "
                                                           "space."),
                io.Latent.Output("noisy_random", tooltip="The latent noised at t with the random noise, VAE space."),
                io.String.Output("stats", tooltip="The statistics table as text."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode=None, metric=None, latent_format=None):
        """Queue-time check of the dropdowns (ComfyUI does not check a V3 Combo's value)."""
        return validate_choices(mode, metric, latent_format)

    @classmethod
    def execute(cls, latent, k, mode, metric, seed, t, model=None, latent_format="auto", coarse=0) -> io.NodeOutput:
        result = preview(latent, k, mode, metric, seed, t, model, latent_format, coarse=coarse)
        sheet = torch.from_numpy(result.sheet).float().div_(255.0).unsqueeze(0)
        outs = []
        for name in ("assigned_noise", "random_noise", "noisy_assigned", "noisy_random"):
            out = {key: value for key, value in latent.items() if key == "batch_index"}
            out.update(result.latents[name])
            outs.append(out)
        return io.NodeOutput(sheet, *outs, result.text)


NODES = [ImmiscibleNoise, ImmiscibleNoisePreview]


class ImmiscibleExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .train import NODES as TRAIN_NODES  # imports nodes_train only when its schema is built

        return [*NODES, *TRAIN_NODES]


async def comfy_entrypoint() -> ImmiscibleExtension:
    return ImmiscibleExtension()
