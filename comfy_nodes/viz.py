"""The Immiscible Noise Preview's pictures and numbers: assigned versus random noise, as RGB arrays.

Pure functions from tensors to ``numpy`` arrays (matplotlib Agg); nothing here imports ComfyUI.
The selection's own numbers come in as its ``immiscible.SelectionInfo`` (every candidate's distance
and cosine, the chosen one's, the candidate mean and the reduction ``1 - d(chosen) / mean
d(candidates)``, and their pooled ``coarse_*`` versions); :func:`preview_stats` reads them and
scores only the random noise, once, and the sheet and the text read its result.
Every tensor is in *model space* (the space where the noise is standard Gaussian, after a latent
format's ``process_in``), one sample per leading index: ``[B, C, H, W]`` or ``[B, C, T, H, W]``.

>>> import torch
>>> from comfy_nodes import viz
>>> viz.latent_to_rgb(torch.zeros(4, 8, 8)).shape
(8, 8, 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import immiscible

__all__ = ["latent_to_rgb", "noise_moments", "noise_stats", "pairing_projection", "count_crossings", "figure_to_rgb",
           "PreviewData", "PreviewStats", "preview_stats", "stats_rows", "format_stats", "render_preview_sheet"]

#: Colours of the two pairings, used in every panel.
RANDOM_COLOR = "#d62728"
ASSIGNED_COLOR = "#1f77b4"


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the preview sheet needs matplotlib: pip install matplotlib") from exc
    return plt


# --------------------------------------------------------------------------- pixels


def latent_to_rgb(latent: torch.Tensor, rgb_factors=None, rgb_bias=None) -> np.ndarray:
    """An RGB approximation of one model-space latent, float32 ``[H, W, 3]`` in [0, 1].

    Parameters
    ----------
    latent : Tensor, shape (C, H, W) or (C, T, H, W)
        One sample; of a video latent the middle frame is shown.
    rgb_factors : array-like, shape (C, 3), optional
        Linear latent-to-RGB factors (a latent format's ``latent_rgb_factors``), applied as
        ``rgb = latent^T @ factors + bias`` and mapped from [-1, 1] to [0, 1], the way ComfyUI's
        latent previewer does. Without them the first three channels (or channel 0 as grey) are
        shown with +-3 mapped to [0, 1].
    """
    x = latent.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        x = x[:, x.shape[1] // 2]
    if x.dim() != 3:
        raise ValueError(f"latent must have shape [C, H, W] or [C, T, H, W], got {tuple(latent.shape)}")
    channels = x.shape[0]
    if rgb_factors is not None:
        factors = torch.as_tensor(rgb_factors, dtype=torch.float32)
        if factors.shape != (channels, 3):
            raise ValueError(f"rgb_factors must have shape [{channels}, 3] for a {channels}-channel latent, "
                             f"got {tuple(factors.shape)}")
        rgb = torch.einsum("chw,cr->hwr", x, factors)
        if rgb_bias is not None:
            rgb = rgb + torch.as_tensor(rgb_bias, dtype=torch.float32)
        rgb = (rgb + 1.0) / 2.0
    else:
        rgb = x[:3] if channels >= 3 else x[:1].expand(3, -1, -1)
        rgb = rgb.permute(1, 2, 0) / 6.0 + 0.5
    return rgb.clamp(0.0, 1.0).numpy()


# --------------------------------------------------------------------------- numbers


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).to("cpu", torch.float32)


def noise_moments(noise: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample ``mean`` and ``std`` of ``noise`` (``[B, ...]``), arrays of shape ``[B]``."""
    n = _flat(noise)
    return {"mean": n.mean(1).numpy(),
            "std": n.std(1).numpy() if n.shape[1] > 1 else np.zeros(n.shape[0], np.float32)}


def noise_stats(latents: torch.Tensor, noise: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample statistics of ``noise`` against ``latents`` (both ``[B, ...]``), in fp32.

    Returns arrays of shape ``[B]``: ``distance`` (squared L2), ``cosine``, ``mean`` and ``std``
    of the noise.
    """
    x, n = _flat(latents), _flat(noise)
    if x.shape != n.shape:
        raise ValueError(f"latents and noise must have the same shape, got {tuple(latents.shape)} "
                         f"and {tuple(noise.shape)}")
    dist = (x - n).square().sum(1)
    cos = (x * n).sum(1) / (x.norm(dim=1) * n.norm(dim=1)).clamp_min(1e-30)
    return {"distance": dist.numpy(), "cosine": cos.numpy(), **noise_moments(noise)}


def pairing_projection(latents: torch.Tensor, *noises: torch.Tensor):
    """2-D coordinates of latents and noises in the plane of the latents' top principal directions.

    The basis is the top two right singular vectors of the (uncentred) latent matrix, completed by
    a fixed pseudo-random orthogonal direction when the batch spans fewer than two. Noises are
    projected onto the same basis. Latent coordinates are divided by ``scale`` so both clouds have
    the same RMS radius (a noise projection is about N(0, 1) per axis, a latent's can be hundreds).

    Returns ``(latent_xy [B, 2], [noise_xy [B, 2], ...], scale)`` as numpy arrays and a float.
    """
    x = latents.detach().reshape(latents.shape[0], -1).to("cpu", torch.float64)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    basis = [vh[i] for i in range(min(2, vh.shape[0])) if s[i] > 1e-12 * max(float(s[0]), 1e-300)]
    gen = torch.Generator().manual_seed(0)
    while len(basis) < 2:
        v = torch.randn(x.shape[1], generator=gen, dtype=torch.float64)
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm().clamp_min(1e-300))
    basis = torch.stack(basis, 1)  # [D, 2]
    lat = x @ basis
    projected = [n.detach().reshape(n.shape[0], -1).to("cpu", torch.float64) @ basis for n in noises]
    noise_rms = float(torch.cat(projected).square().sum(1).mean().sqrt()) if projected else 1.0
    lat_rms = float(lat.square().sum(1).mean().sqrt())
    scale = lat_rms / noise_rms if lat_rms > 0 and noise_rms > 0 else 1.0
    return (lat / scale).numpy(), [p.numpy() for p in projected], scale


def _orient(a, b, c):
    return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))


def count_crossings(starts: np.ndarray, ends: np.ndarray) -> int:
    """Number of pairs of segments ``starts[i] -> ends[i]`` (``[N, 2]``) that properly cross."""
    starts, ends = np.asarray(starts, float), np.asarray(ends, float)
    crossings = 0
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            p, q, r, s = starts[i], ends[i], starts[j], ends[j]
            if _orient(p, q, r) * _orient(p, q, s) < 0 and _orient(r, s, p) * _orient(r, s, q) < 0:
                crossings += 1
    return crossings


def figure_to_rgb(fig) -> np.ndarray:
    """Render a matplotlib figure to uint8 ``[H, W, 3]`` and close it."""
    plt = _require_matplotlib()
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3])
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- the sheet


@dataclass
class PreviewData:
    """Everything the preview sheet shows; tensors in model space, ``[B, ...]``.

    ``selection`` is the selection's ``immiscible.SelectionInfo`` with every candidate's scores
    (``distances`` and ``cosines`` ``[B, M]``: its own ``k`` for knn, the shared pool for assign),
    and under coarse selection the pooled ``coarse_*`` ones. ``candidate_distances``,
    ``candidate_cosines`` and ``chosen`` read it.
    """

    latents: torch.Tensor
    random_noise: torch.Tensor
    assigned_noise: torch.Tensor
    noisy_random: torch.Tensor
    noisy_assigned: torch.Tensor
    selection: immiscible.SelectionInfo
    t: float
    settings: dict = field(default_factory=dict)
    rgb_factors: object = None
    rgb_bias: object = None
    #: the noised latents are drawn times this (``1/sqrt(1+sigma^2)`` for ``x + sigma*noise``, the
    #: model's input scaling), so they stay in the RGB range; 1 for flow models.
    noisy_display_scale: float = 1.0

    @property
    def candidate_distances(self) -> torch.Tensor:
        return self.selection.distances

    @property
    def candidate_cosines(self) -> torch.Tensor:
        return self.selection.cosines

    @property
    def chosen(self) -> torch.Tensor:
        return self.selection.index


@dataclass
class PreviewStats:
    """Per-sample statistics (numpy ``[B]``) of both noises, computed once by :func:`preview_stats`.

    ``random`` and ``assigned`` map ``distance``, ``cosine``, ``reduction``, ``mean`` and ``std`` to
    arrays (and ``coarse_distance``, ``coarse_cosine``, ``coarse_reduction`` in the pooled space with
    coarse selection). ``reduction`` is the core's ``1 - d / mean d(candidates)``: the assigned
    noise's is ``SelectionInfo.reduction_per_sample``, the random noise's applies it to the random
    noise's distance. ``candidate_mean`` is ``SelectionInfo.mean_distance`` (``coarse_candidate_mean``
    its pooled version).
    """

    random: dict[str, np.ndarray]
    assigned: dict[str, np.ndarray]
    candidate_mean: np.ndarray
    elements: int
    coarse: int | None = None
    coarse_candidate_mean: np.ndarray | None = None


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _reduction(distance: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``SelectionInfo``'s reduction ``1 - d / mean d(candidates)`` for a noise that is not the chosen one."""
    return 1.0 - distance / np.maximum(mean, 1e-30)


def preview_stats(data: PreviewData) -> PreviewStats:
    """The statistics of a preview. The assigned noise's are the selection's own (``SelectionInfo``);
    only the random noise is scored here."""
    sel = data.selection
    assigned = {"distance": _np(sel.distance), "cosine": _np(sel.cosine), "reduction": _np(sel.reduction_per_sample),
                **noise_moments(data.assigned_noise)}
    random = noise_stats(data.latents, data.random_noise)
    mean = _np(sel.mean_distance)
    random["reduction"] = _reduction(random["distance"], mean)
    stats = PreviewStats(random, assigned, mean, data.latents[0].numel())
    if sel.coarse is not None:
        size = sel.coarse
        pooled_random = noise_stats(immiscible.coarse_pool(data.latents, size),
                                    immiscible.coarse_pool(data.random_noise, size))
        stats.coarse, stats.coarse_candidate_mean = size, _np(sel.coarse_mean_distance)
        random["coarse_distance"], random["coarse_cosine"] = pooled_random["distance"], pooled_random["cosine"]
        random["coarse_reduction"] = _reduction(random["coarse_distance"], stats.coarse_candidate_mean)
        assigned["coarse_distance"], assigned["coarse_cosine"] = _np(sel.coarse_distance), _np(sel.coarse_cosine)
        assigned["coarse_reduction"] = _np(sel.coarse_reduction_per_sample)
    return stats


def stats_rows(stats: PreviewStats) -> list[dict]:
    """The table's rows: one for random, one for assigned, each averaged over the batch.

    ``reduction_vs_candidates`` is the core's reduction in % (for the assigned noise,
    ``SelectionInfo.reduction * 100``). ``reduction_vs_random`` is another quantity,
    ``1 - d(noise) / d(random noise)``, which the core does not compute.
    """
    rand_dist = np.maximum(stats.random["distance"], 1e-30)
    rows = []
    for name, st in (("random", stats.random), ("assigned", stats.assigned)):
        rows.append({
            "noise": name,
            "distance": float(np.mean(st["distance"])) / stats.elements,
            "reduction_vs_candidates": float(np.mean(st["reduction"])) * 100,
            "reduction_vs_random": float(np.mean(1.0 - st["distance"] / rand_dist)) * 100,
            "cosine": float(np.mean(st["cosine"])),
            "mean": float(np.mean(st["mean"])),
            "std": float(np.mean(st["std"])),
        })
        if stats.coarse is not None:
            rows[-1]["coarse_cosine"] = float(np.mean(st["coarse_cosine"]))
            rows[-1]["coarse_reduction_vs_candidates"] = float(np.mean(st["coarse_reduction"])) * 100
    return rows


def format_stats(data: PreviewData, stats: PreviewStats) -> str:
    """The statistics as plain text (the STRING output of the ComfyUI preview node)."""
    s = data.settings
    head = ", ".join(f"{k}={v}" for k, v in s.items())
    lines = [f"immiscible preview: {head}" if head else "immiscible preview",
             f"latent shape {tuple(data.latents.shape)}, {stats.elements} elements/sample, t={data.t:g}",
             f"{'noise':<9}{'dist/elem':>10}{'red. vs cand %':>16}{'red. vs random %':>18}{'cosine':>9}"
             f"{'mean':>9}{'std':>8}" + (_pooled_head(stats.coarse) if stats.coarse else "")]
    for r in stats_rows(stats):
        lines.append(f"{r['noise']:<9}{r['distance']:>10.4f}{r['reduction_vs_candidates']:>16.3f}"
                     f"{r['reduction_vs_random']:>18.3f}{r['cosine']:>9.4f}{r['mean']:>9.4f}{r['std']:>8.4f}"
                     + (f"{r['coarse_cosine']:>14.4f}{r['coarse_reduction_vs_candidates']:>18.3f}"
                        if stats.coarse else ""))
    return "\n".join(lines)


def _pooled_head(n: int) -> str:
    """The text table's pooled-space column titles (coarse selection)."""
    return f"{f'cos {n}x{n}':>14}{f'red. {n}x{n} %':>18}"


def _image_rows(fig, grid, data: PreviewData, rows: int):
    scaled = "" if data.noisy_display_scale == 1.0 else f" x{data.noisy_display_scale:.2g}"
    frame = " (middle frame)" if data.latents.dim() == 5 else ""
    titles = [f"latent{frame}", "random noise", "assigned noise", f"noised, random (t={data.t:g}){scaled}",
              f"noised, assigned (t={data.t:g}){scaled}"]
    tensors = [data.latents, data.random_noise, data.assigned_noise,
               data.noisy_random * data.noisy_display_scale, data.noisy_assigned * data.noisy_display_scale]
    colors = [None, RANDOM_COLOR, ASSIGNED_COLOR, RANDOM_COLOR, ASSIGNED_COLOR]
    for r in range(rows):
        for c, (title, tensor, color) in enumerate(zip(titles, tensors, colors)):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(latent_to_rgb(tensor[r], data.rgb_factors, data.rgb_bias), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if color:
                for spine in ax.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2.5)
            if r == 0:
                ax.set_title(title, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"sample {r}", fontsize=10)


def _pairing_panel(ax, data: PreviewData):
    lat, (rnd, asg), scale = pairing_projection(data.latents, data.random_noise, data.assigned_noise)
    n_rnd, n_asg = count_crossings(lat, rnd), count_crossings(lat, asg)
    for i in range(len(lat)):
        ax.plot([lat[i, 0], rnd[i, 0]], [lat[i, 1], rnd[i, 1]], "--", color=RANDOM_COLOR, lw=1, alpha=0.7)
        ax.plot([lat[i, 0], asg[i, 0]], [lat[i, 1], asg[i, 1]], "-", color=ASSIGNED_COLOR, lw=1.5, alpha=0.9)
    ax.scatter(lat[:, 0], lat[:, 1], c="black", marker="s", s=28, label=f"latent (x 1/{scale:.3g})", zorder=3)
    ax.scatter(rnd[:, 0], rnd[:, 1], c=RANDOM_COLOR, marker="x", s=24, label=f"random: {n_rnd} crossings",
               zorder=3)
    ax.scatter(asg[:, 0], asg[:, 1], c=ASSIGNED_COLOR, marker="o", s=20, label=f"assigned: {n_asg} crossings",
               zorder=3)
    if len(lat) <= 8:
        for i in range(len(lat)):
            ax.annotate(str(i), lat[i], fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_title("pairing (top-2 latent PCs)", fontsize=10)
    ax.legend(fontsize=8, loc="best", framealpha=0.8)
    ax.tick_params(labelsize=7)
    return n_rnd, n_asg


def ranking_distances(data: PreviewData, stats: PreviewStats) -> tuple[np.ndarray, np.ndarray, str]:
    """Candidate and random-noise squared distances in the space the candidates were ranked in, as % of
    each sample's candidate mean: ``(candidates [B, M], random [B], space)``.

    That is the pooled N x N space under coarse selection (``space`` = ``"pooled NxN"``), else the
    full latent (``"full"``), so the chosen candidate sits where the ranking put it.
    """
    if data.selection.coarse is not None and stats.coarse is not None:
        cand, rand, mean, space = (data.selection.coarse_distances, stats.random["coarse_distance"],
                                   stats.coarse_candidate_mean, f"pooled {stats.coarse}x{stats.coarse}")
    else:
        cand, rand, mean, space = data.candidate_distances, stats.random["distance"], stats.candidate_mean, "full"
    mean = np.maximum(mean, 1e-30)
    rel = (cand.detach().to("cpu", torch.float64).numpy() / mean[:, None] - 1.0) * 100
    return rel, (rand / mean - 1.0) * 100, space


def _histogram_panel(ax, data: PreviewData, stats: PreviewStats, max_samples: int):
    rel, rand_rel, space = ranking_distances(data, stats)
    chosen = data.chosen.detach().to("cpu").long().numpy()
    cmap = _require_matplotlib().get_cmap("tab10")
    shown = min(len(rel), max_samples)
    bins = np.linspace(min(rel[:shown].min(), rand_rel[:shown].min()), max(rel[:shown].max(), rand_rel[:shown].max()),
                       min(40, max(8, rel.shape[1] // 2)) + 1)
    top = ax.get_xaxis_transform()  # x in data units, y in axes units
    for b in range(shown):
        color = cmap(b % 10)
        ax.hist(rel[b], bins=bins, histtype="step", color=color, lw=1.2, label=f"sample {b}")
        ax.axvline(rel[b, chosen[b]], color=color, lw=2, ls="-", alpha=0.8)
        ax.plot(rel[b, chosen[b]], 1.0, marker="v", ms=9, color=color, transform=top, clip_on=False)
        ax.axvline(rand_rel[b], color=color, lw=1.2, ls=":")
        ax.plot(rand_rel[b], 1.0, marker="v", ms=8, mfc="white", color=color, transform=top, clip_on=False)
    pad = 0.06 * (bins[-1] - bins[0] or 1.0)
    ax.set_xlim(bins[0] - pad, bins[-1] + pad)
    ax.plot([], [], color="gray", lw=2, ls="-", marker="v", label="chosen (assigned)")
    ax.plot([], [], color="gray", lw=1.2, ls=":", marker="v", mfc="white", label="random noise")
    where = "" if space == "full" else f" ({space}: the ranking space)"
    ax.set_xlabel(f"squared distance to latent{where}, % vs candidate mean", fontsize=8)
    ax.set_ylabel("candidates", fontsize=8)
    n_cand = rel.shape[1]
    ax.set_title(f"candidate distances ({n_cand} per sample{'' if space == 'full' else ', ' + space})",
                 fontsize=10, pad=12)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    ax.tick_params(labelsize=7)


def _table_panel(ax, data: PreviewData, stats: PreviewStats, crossings):
    ax.axis("off")
    rnd, asg = stats_rows(stats)
    labels = ["distance / element", "reduction vs candidate mean %", "reduction vs random noise %",
              "cosine(noise, latent)", "noise mean", "noise std", "pairing-plot crossings"]
    keys = [("distance", "{:.4f}"), ("reduction_vs_candidates", "{:+.3f}"), ("reduction_vs_random", "{:+.3f}"),
            ("cosine", "{:+.4f}"), ("mean", "{:+.4f}"), ("std", "{:.4f}")]
    if stats.coarse:
        n = stats.coarse
        labels[-1:-1] = [f"cosine, pooled {n}x{n}", f"reduction vs cand. mean, pooled {n}x{n} %"]
        keys += [("coarse_cosine", "{:+.4f}"), ("coarse_reduction_vs_candidates", "{:+.3f}")]
    cells = [[fmt.format(rnd[key]), fmt.format(asg[key])] for key, fmt in keys]
    cells.append([str(crossings[0]), str(crossings[1])])
    table = ax.table(cellText=cells, rowLabels=labels, colLabels=["random", "assigned"], loc="upper right",
                     cellLoc="center", colWidths=[0.26, 0.26], bbox=[0.48, 0.2, 0.52, 0.78])
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    for (r, c), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold", color=RANDOM_COLOR if c == 0 else ASSIGNED_COLOR)
        if c == -1:
            cell.set_text_props(ha="right")
    ax.set_title("statistics (batch means, model space)", fontsize=10)
    settings = [f"{k}={v}" for k, v in data.settings.items()]
    lines = [", ".join(settings[i:i + 4]) for i in range(0, len(settings), 4)]
    ax.text(0.5, 0.0, "\n".join(lines), ha="center", va="bottom", fontsize=8, transform=ax.transAxes)


def render_preview_sheet(data: PreviewData, stats: PreviewStats, *, max_rows: int = 4, dpi: int = 100) -> np.ndarray:
    """The preview sheet as uint8 ``[H, W, 3]``.

    Top: for up to ``max_rows`` samples, the latent, the random noise, the assigned noise and both
    noised at ``t`` (RGB approximations; random framed red, assigned blue). Bottom: the pairing
    plot, the candidate-distance histogram with the chosen candidate marked, and the table.
    """
    plt = _require_matplotlib()
    from matplotlib.gridspec import GridSpec

    batch = data.latents.shape[0]
    rows = min(batch, max_rows)
    fig = plt.figure(figsize=(12.5, 2.3 * rows + 4.6), dpi=dpi)
    height = 2.3 * rows + 4.6
    outer = GridSpec(2, 1, figure=fig, height_ratios=[2.3 * rows, 4.0], hspace=0.2,
                     left=0.04, right=0.98, top=1 - 0.75 / height, bottom=0.35 / height * 2.2)
    top = outer[0].subgridspec(rows, 5, wspace=0.05, hspace=0.12)
    bottom = outer[1].subgridspec(1, 3, wspace=0.28, width_ratios=[1.0, 1.1, 1.25])
    _image_rows(fig, top, data, rows)
    crossings = _pairing_panel(fig.add_subplot(bottom[0]), data)
    _histogram_panel(fig.add_subplot(bottom[1]), data, stats, max_rows)
    _table_panel(fig.add_subplot(bottom[2]), data, stats, crossings)
    title = "Immiscible noise: random vs assigned"
    if batch > rows:
        title += f"  (showing {rows} of {batch} samples)"
    fig.suptitle(title, fontsize=13, weight="bold", y=1 - 0.12 / height)
    return figure_to_rgb(fig)
