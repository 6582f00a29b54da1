"""PNG plots of metric histories (what people would rather look at than read)."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_metrics(records: list[dict], keys: list[str], path: str, title: str = "",
                 x_key: str = "step") -> None:
  """One panel per metric key, x = `x_key`; keys missing from every record are skipped."""
  keys = [k for k in keys if any(k in r for r in records)]
  if not keys:
    raise ValueError(f"none of the keys {keys} appear in the records")
  cols = min(3, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    points = [(r[x_key], r[key]) for r in records if key in r]
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    ax.set_title(key)
    ax.set_xlabel(x_key)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_series(series: dict[str, tuple[list, list]], path: str, xlabel: str, ylabel: str,
                title: str = "", logy: bool = False) -> None:
  """Several labelled (x, y) lines on one axis (log-scaled y with `logy`): ablation sweeps side
  by side."""
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for label, (xs, ys) in series.items():
    ax.plot(xs, ys, marker="o", markersize=3, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_checkpoint_comparison(results: dict[str, dict], path: str, title: str = "") -> None:
  """The long-vs-short figure: accuracy against mean response tokens per checkpoint, and
  pass@1 and mean tokens per difficulty level side by side.

  `results` maps a checkpoint name to {"pass@1", "mean_tokens", "pass@1_by_level",
  "tokens_by_level"} (level dicts keyed by level)."""
  names = list(results)
  levels = sorted({lvl for r in results.values() for lvl in r["pass@1_by_level"]})
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  ax = axes[0]
  for i, name in enumerate(names):  # colour i matches the bars of checkpoint i
    ax.scatter(results[name]["mean_tokens"], results[name]["pass@1"], s=40, color=f"C{i}")
    ax.annotate(name, (results[name]["mean_tokens"], results[name]["pass@1"]),
                textcoords="offset points", xytext=(5, 4))
  ax.margins(0.2)
  ax.set_xlabel("mean response tokens")
  ax.set_ylabel("pass@1")
  ax.grid(alpha=0.3)
  width = 0.8 / max(len(names), 1)
  for ax, key, label in ((axes[1], "pass@1_by_level", "pass@1"),
                         (axes[2], "tokens_by_level", "mean response tokens")):
    for i, name in enumerate(names):
      ax.bar([j + i * width for j in range(len(levels))],
             [results[name][key].get(lvl, float("nan")) for lvl in levels], width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(levels))])
    ax.set_xticklabels([f"level {lvl}" for lvl in levels])
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis="y")
  axes[2].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
