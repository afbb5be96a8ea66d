"""``loss.png``: training loss (and its running mean) and held-out loss against the step."""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def _smooth(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_losses(metrics_path: str | Path, out_path: str | Path, *, title: str = "") -> Path | None:
    """Write the loss plot; returns its path, or None when there is nothing to plot yet."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    held = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
    if not train and not held:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=0.8, label="train loss")
        ax.plot(steps, _smooth(list(losses), 10), color="tab:blue", linewidth=1.6, label="train (running mean)")
    if held:
        steps, losses = zip(*held)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.6, label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "zerotrain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
