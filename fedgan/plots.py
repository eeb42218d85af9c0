"""Figures of a run: sample grids, losses, metrics, partitions, ablations; a checkpoint browser."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedgan.checkpoints import list_checkpoints, load_generator
from fedgan.models import generate
from fedgan.partition import partition_report

Tensor = torch.Tensor


def _integer_rounds(ax) -> None:
    """Label an x axis of rounds with whole numbers (matplotlib's default ticks fall at 2.5, 7.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(fig, save_to: str | os.PathLike | None):
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=120, bbox_inches="tight")
    return fig


def image_grid(images: Tensor, nrow: int = 10) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> an [H', W', C] float array in [0, 1] for imshow."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1)
    return grid.permute(1, 2, 0).numpy()  # (C, H', W') -> (H', W', C)


def plot_images(images: Tensor, *, nrow: int = 10, title: str = "", row_labels: Sequence[str] | None = None,
                ax=None, save_to: str | os.PathLike | None = None):
    """A grid of images; with `row_labels`, each row is named on the left (e.g. the digit it shows)."""
    import matplotlib.pyplot as plt

    if ax is None:
        rows = math.ceil(len(images) / nrow)
        fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.6, 0.5 * rows + 0.5))
    fig = ax.figure
    ax.imshow(image_grid(images, nrow))
    ax.set_title(title)
    ax.set_xticks([])
    if row_labels is None:
        ax.set_yticks([])
    else:
        cell = images.shape[-2] + 2  # make_grid pads 2 pixels
        ax.set_yticks([2 + cell * i + images.shape[-2] / 2 for i in range(len(row_labels))])
        ax.set_yticklabels(row_labels)
        ax.tick_params(length=0)
    return _finish(fig, save_to)


def plot_label_grid(images: Tensor, class_names: Sequence[str] = tuple("0123456789"), *, title: str = "",
                    ax=None, save_to: str | os.PathLike | None = None):
    """A label-major grid (one row per class, e.g. Federation.sample_grid()) with the class on each row."""
    return plot_images(images, nrow=len(images) // len(class_names), title=title, row_labels=class_names, ax=ax,
                       save_to=save_to)


def plot_grid_evolution(snapshots: Mapping[int, Tensor], rounds: Sequence[int] | None = None, *,
                        class_names: Sequence[str] = tuple("0123456789"), save_to: str | os.PathLike | None = None):
    """Fixed-noise label grids side by side at a few rounds (default: up to 5, first to last)."""
    import matplotlib.pyplot as plt

    available = sorted(snapshots)
    if rounds is None:
        picks = np.unique(np.linspace(0, len(available) - 1, min(5, len(available))).round().astype(int))
        rounds = [available[i] for i in picks]
    missing = [r for r in rounds if r not in snapshots]
    if missing:
        raise ValueError(f"rounds {missing} have no snapshot; available: {available}")
    fig, axes = plt.subplots(1, len(rounds), figsize=(3.2 * len(rounds), 3.4), squeeze=False)
    for ax, r in zip(axes[0], rounds):
        plot_label_grid(snapshots[r], class_names, title=f"round {r}", ax=ax)
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_losses(history: Sequence[Mapping[str, Any]], *, ax=None, save_to: str | os.PathLike | None = None):
    """Mean D and G loss per round (thick), each client's (thin)."""
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("history is empty: run at least one round first")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    rounds = [r["round"] for r in history]
    for key, color in (("d_loss", "tab:blue"), ("g_loss", "tab:orange")):
        for r in history:
            ax.scatter([r["round"]] * len(r[f"{key}_clients"]), r[f"{key}_clients"], s=6, color=color, alpha=0.3)
        ax.plot(rounds, [r[key] for r in history], color=color, lw=2, marker="o",
                label=f"{'discriminator' if key == 'd_loss' else 'generator'} (mean of clients)")
    _integer_rounds(ax)
    ax.set_ylabel("loss (BCE)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _finish(ax.figure, save_to)


def plot_partition(labels: Any, parts: Sequence[np.ndarray], *, class_names: Sequence[str] | None = None,
                   ax=None, save_to: str | os.PathLike | None = None):
    """Heatmap of images per (client, label), annotated with the counts."""
    import matplotlib.pyplot as plt

    counts = partition_report(labels, parts, len(class_names) if class_names else None)
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.6 * counts.shape[1] + 2, 0.35 * counts.shape[0] + 1.2))
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.figure.colorbar(image, ax=ax, label="images")
    ax.set_xticks(range(counts.shape[1]))
    ax.set_xticklabels(class_names or range(counts.shape[1]))
    ax.set_yticks(range(counts.shape[0]))
    ax.set_xlabel("label")
    ax.set_ylabel("client")
    if counts.size <= 400:
        threshold = (counts.min() + counts.max()) / 2  # the colour scale's middle: dark below, light above
        for (row, col), value in np.ndenumerate(counts):
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7,
                    color="black" if value > threshold else "white")
    ax.set_title(f"{counts.shape[0]} clients, {counts.sum():,} images")
    return _finish(ax.figure, save_to)


def draw_checkpoint_samples(run_dir: str | os.PathLike, round_index: int, label: int, n: int = 10, seed: int = 0):
    """The figure an interactive browser shows: `n` samples of `label` from the generator saved at a round."""
    path = Path(run_dir) / f"round_{round_index:04d}.pt"
    if not path.is_file():
        saved = [int(p.stem.split("_")[1]) for p in list_checkpoints(run_dir)]
        raise ValueError(f"round {round_index} has no checkpoint in {run_dir}; saved rounds: {saved}")
    generator = load_generator(path)
    images = generate(generator, [label] * n, seed=seed)
    return plot_images(images, nrow=n, title=f"round {round_index}: {n} samples of label {label}")


def browse_checkpoints(run_dir: str | os.PathLike, class_names: Sequence[str] = tuple("0123456789")):
    """ipywidgets browser: a slider over the saved rounds and a dropdown of labels."""
    import ipywidgets
    import matplotlib.pyplot as plt

    rounds = [int(p.stem.split("_")[1]) for p in list_checkpoints(run_dir)]
    if not rounds:
        raise ValueError(f"no checkpoints in {run_dir}")

    def show(round_index: int, label: int) -> None:
        draw_checkpoint_samples(run_dir, round_index, label)
        plt.show()

    return ipywidgets.interact(
        show,
        round_index=ipywidgets.SelectionSlider(options=rounds, value=rounds[-1], description="round"),
        label=ipywidgets.Dropdown(options=[(name, i) for i, name in enumerate(class_names)], value=0,
                                  description="label"))


def plot_metrics(history: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None, *,
                 save_to: str | os.PathLike | None = None):
    """FID, conditional accuracy and IS over the evaluated rounds, and beside them, where the records have them,
    precision, recall and coverage (is every mode of the data drawn?); dashed: the real-data reference."""
    import matplotlib.pyplot as plt

    evaluated = [r for r in history if "metrics" in r]
    if not evaluated:
        raise ValueError("no round in the history was evaluated (set eval_every)")
    rounds = [r["round"] for r in evaluated]
    modes = all("coverage" in r["metrics"] for r in evaluated)  # histories from before these metrics lack them
    fig, axes = plt.subplots(1, 4 if modes else 3, figsize=(17 if modes else 13, 3.3))
    for ax, (key, title) in zip(axes, (("fid", "FID (classifier features), lower is better"),
                                       ("cond_acc", "conditional accuracy"), ("is", "IS (classifier)"))):
        ax.plot(rounds, [r["metrics"][key] for r in evaluated], marker="o", label="generated")
        if reference is not None and key in reference:
            ax.axhline(reference[key], ls="--", color="gray",
                       label="real train vs test" if key == "fid" else "real test images")
        ax.set_title(title)
    if modes:
        ax = axes[3]
        for key in ("precision", "recall", "coverage"):
            line, = ax.plot(rounds, [r["metrics"][key] for r in evaluated], marker="o", label=key)
            if reference is not None and key in reference:
                ax.axhline(reference[key], ls="--", color=line.get_color(), alpha=0.6)
        ax.set_title("precision, recall, coverage (dashed: real train vs test)")
        ax.set_ylim(0, 1.05)
    for ax in axes:
        _integer_rounds(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_per_class_accuracy(per_class_acc: Sequence[float], reference: Sequence[float] | None = None, *,
                            class_names: Sequence[str] = tuple("0123456789"), title: str = "",
                            save_to: str | os.PathLike | None = None):
    """Bars: how often a generated image of each requested label is classified as that label; ticks: real images."""
    import matplotlib.pyplot as plt

    if len(per_class_acc) != len(class_names) or (reference is not None and len(reference) != len(class_names)):
        raise ValueError(f"per_class_acc and reference need one value per class ({len(class_names)}); got "
                         f"{len(per_class_acc)} and {None if reference is None else len(reference)}")
    fig, ax = plt.subplots(figsize=(7, 3))
    bars = ax.bar(range(len(class_names)), per_class_acc, label="generated")
    ax.bar_label(bars, fmt="%.2f", label_type="center", color="white", fontsize=8)
    if reference is not None:
        ax.plot(range(len(class_names)), reference, "k_", markersize=20, label="real test images")
    ax.set_xticks(range(len(class_names)))
    ax.set_xticklabels(class_names)
    ax.set_xlabel("requested label")
    ax.set_ylabel("classified as requested")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)  # beside the bars, never over them
    return _finish(fig, save_to)


def plot_metric_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], metric: str = "fid", *,
                       x: str = "images_total", reference: float | None = None, title: str = "", ax=None,
                       save_to: str | os.PathLike | None = None):
    """One curve a run: `metric` of its evaluated rounds against `x` ("images_total", "round" or "bytes_total")."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for label, history in histories.items():
        evaluated = [r for r in history if "metrics" in r]
        ax.plot([r[x] for r in evaluated], [r["metrics"][metric] for r in evaluated], marker="o", ms=3, label=label)
    if reference is not None:
        ax.axhline(reference, ls="--", color="gray", label="reference")
    if x == "round":
        _integer_rounds(ax)
    else:
        ax.set_xlabel({"images_total": "images seen", "bytes_total": "bytes sent"}.get(x, x))
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_lines(rows: Sequence[Mapping[str, Any]], x: str, y: str, group: str, *, title: str = "", ax=None,
               save_to: str | os.PathLike | None = None):
    """Rows of an ablation as one line per value of `group` (e.g. FID against attacker fraction per strategy)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for value in dict.fromkeys(row[group] for row in rows):
        points = sorted((row[x], row[y]) for row in rows if row[group] == value)
        ax.plot(*zip(*points), marker="o", label=str(value))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_seed_spread(summary: Sequence[Mapping[str, Any]], metric: str = "fid", *, title: str = "", ax=None,
                     save_to: str | os.PathLike | None = None):
    """One row a cell of `run_seeds`' summary: a dot a seed, a bar at the mean (is a gap between cells more than
    the spread of one cell?)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.45 * len(summary) + 1.2))
    prefix = f"{metric}@"
    for row_index, line in enumerate(summary):
        values = [v for k, v in line.items() if k.startswith(prefix)]
        ax.scatter(values, [row_index] * len(values), color="tab:blue", alpha=0.7, zorder=3,
                   label="one seed" if row_index == 0 else None)
        ax.plot([line[f"{metric}_mean"]] * 2, [row_index - 0.3, row_index + 0.3], color="black",
                label="mean" if row_index == 0 else None)
    ax.set_yticks(range(len(summary)))
    ax.set_yticklabels([line["cell"] for line in summary])
    ax.invert_yaxis()  # the first cell on top, as in the table
    ax.set_xlabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _finish(ax.figure, save_to)


def plot_class_heatmap(rows: Sequence[Mapping[str, Any]], key: str = "per_class_coverage", *,
                       class_names: Sequence[str] = tuple("0123456789"), label: str = "cell", title: str = "",
                       ax=None, save_to: str | os.PathLike | None = None):
    """A row a cell, a column a class, coloured by a per-class metric in [0, 1] (e.g. coverage: which classes each
    method loses); the values written in the squares."""
    import matplotlib.pyplot as plt

    values = np.array([row[key] for row in rows], dtype=float)  # (cells, classes)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.6 * values.shape[1] + 3, 0.42 * len(rows) + 1.2))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(values):
        ax.text(c, r, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                color="white" if value < 0.6 else "black")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels(class_names[: values.shape[1]])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([row[label] for row in rows])
    ax.set_title(title or key)
    ax.figure.colorbar(image, ax=ax, fraction=0.03)
    return _finish(ax.figure, save_to)


def plot_sample_grids(grids: Mapping[str, Tensor], *, ncols: int = 4, save_to: str | os.PathLike | None = None):
    """Runs' fixed-noise sample grids ([100, C, H, W]: one label a row) side by side, titled by run."""
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(grids) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, images) in zip(axes.flat, grids.items()):
        ax.imshow(image_grid(images, 10))
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    return _finish(fig, save_to)


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], x: str = "MB", y: str = "fid", *, label: str = "cell",
                  title: str = "", ax=None, save_to: str | os.PathLike | None = None):
    """Rows of an ablation as labelled points, e.g. FID against megabytes sent."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.8))
    for row in rows:
        ax.scatter(row[x], row[y])
        ax.annotate(row[label], (row[x], row[y]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _finish(ax.figure, save_to)


def save_round_grids(snapshots: Mapping[int, Tensor], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG of the fixed-noise label grid per round: out_dir/grid_round_XXXX.png."""
    from torchvision.utils import save_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r, images in sorted(snapshots.items()):
        paths.append(out_dir / f"grid_round_{r:04d}.png")
        save_image(images.float(), paths[-1], nrow=10, normalize=True, value_range=(-1, 1), pad_value=1)
    return paths


def save_grid_gif(snapshots: Mapping[int, Tensor], path: str | os.PathLike, seconds_per_frame: float = 0.6) -> Path:
    """An animated GIF of the fixed-noise label grid across rounds."""
    from PIL import Image

    if not snapshots:
        raise ValueError("no snapshots to animate")
    frames = [Image.fromarray((image_grid(snapshots[r]) * 255).round().astype(np.uint8))
              for r in sorted(snapshots)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(seconds_per_frame * 1000), loop=0)
    return path
