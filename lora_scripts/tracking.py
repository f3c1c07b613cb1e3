"""Where training numbers go: TensorBoard scalars under `output_dir/logs/` and a loss-curve PNG."""

from __future__ import annotations

from pathlib import Path

from lora_scripts.atomic import write_atomically


class Tracker:
    """The one TensorBoard writer of a run (main process only: `enabled`) plus the loss history the
    curve and checkpoints keep."""

    def __init__(self, log_dir: Path, history: dict[str, list[list[float]]] | None, enabled: bool) -> None:
        self.history = history or {"loss": [], "eval_loss": []}
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record scalars at a step (loss and eval_loss also go into the history)."""
        for name, value in scalars.items():
            if name in self.history:
                self.history[name].append([step, value])
            if self.writer is not None:
                self.writer.add_scalar(f"train/{name}" if name != "eval_loss" else "eval/loss", value, step)
        if self.writer is not None:
            self.writer.flush()

    def log_image(self, step: int, name: str, image) -> None:
        """Record an HWC uint8 image (e.g. the sample strip) at a step."""
        if self.writer is not None:
            self.writer.add_image(name, image, step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard files."""
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(history: dict[str, list[list[float]]], path: Path) -> None:
    """Write the training (and validation) loss against step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, style in (("loss", "-"), ("eval_loss", "o-")):
        points = history.get(name) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label="validation" if name == "eval_loss" else "training")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp / path.name)

    write_atomically(path.parent, write)
    plt.close(fig)
