"""Progress and log lines on stderr (stdout is kept for --json)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


class LayerProgress:
    """A bar over decoder layers plus one log line per quantized module."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]quantizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("", total=total)
        self.enabled = enabled
        self.started = time.perf_counter()

    def __enter__(self) -> "LayerProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage(self, layer: int, what: str) -> None:
        self.progress.update(self.task, description=f"layer {layer} · {what}")

    def module(self, layer: int, total: int, name: str, seconds: float, loss: float | None) -> None:
        shown = "" if loss is None else f"  loss {loss:.4g}"
        if self.enabled:
            self.progress.console.print(f"layer {layer + 1}/{total}  {name:<22} {seconds:6.2f}s{shown}")

    def note(self, layer: int, total: int, text: str) -> None:
        if self.enabled:
            self.progress.console.print(f"layer {layer + 1}/{total}  {text}")

    def layer_done(self) -> None:
        self.progress.advance(self.task)
