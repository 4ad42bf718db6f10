"""PNG figures for the demo report: training curves and the variance table (paper Table 2)."""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path) -> list[dict]:
  rows = []
  for line in pathlib.Path(path).read_text().splitlines():
    if line.strip():
      rows.append(json.loads(line))
  return rows


def _series(rows, key):
  pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(runs: Mapping[str, str], out_path) -> None:
  """Loss of every run, and VRPO / naive-DPO reward margin and preference accuracy.

  runs: label -> metrics.jsonl path.
  """
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for label, path in runs.items():
    rows = read_metrics(path)
    axes[0].plot(*_series(rows, "loss"), label=label)
    if any("reward_margin" in r for r in rows):
      axes[1].plot(*_series(rows, "reward_margin"), label=label)
      axes[2].plot(*_series(rows, "preference_accuracy"), label=label)
  for ax, title in zip(axes, ("training loss", "reward margin (beta x ELBO differences)", "preference accuracy")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axes[0].set_yscale("log")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def variance_table(rows: Sequence[Mapping], out_path) -> None:
  """Bar charts (log scale) of the score, loss and gradient variances per sampling setting."""
  labels = [f"{r['n_timesteps']}, {r['masks_per_timestep']}\n{'antith.' if r['antithetic'] else 'indep.'}"
            for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, key, title in zip(axes, ("score_variance", "loss_variance", "gradient_variance"),
                            ("Var of score", "Var of loss", "Var of gradient (block-0 FFN up-projection)")):
    values = [r[key] for r in rows]
    colors = ["tab:red" if not r["antithetic"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlabel("n_t, n_yt, sampling")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
