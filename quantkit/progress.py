"""Progress and log lines on stderr (stdout is kept for --json).

Numbering is 1-based everywhere a user reads it: 'layer 4/30' is the fourth decoder layer, and the
bar's 'done 3/30' counts finished layers."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)


def log(message: str) -> None:
    console.print(message)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def _bar(what: str, enabled: bool) -> Progress:
    return Progress(
        TextColumn(f"[bold]{what}"),
        BarColumn(),
        TextColumn("done {task.completed}/{task.total}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class LayerProgress:
    """A bar over decoder layers (current layer and stage, elapsed time, ETA) and one line per
    finished layer; with ``verbose`` also one line per quantized module."""

    def __init__(self, total: int, enabled: bool = True, verbose: bool = False) -> None:
        self.progress = _bar("quantizing", enabled)
        self.task = self.progress.add_task("", total=total)
        self.total = total
        self.enabled = enabled
        self.verbose = verbose
        self._reset()

    def _reset(self) -> None:
        self.started = time.perf_counter()
        self.losses: list[float] = []
        self.notes: list[str] = []

    def __enter__(self) -> "LayerProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def _print(self, layer: int, text: str) -> None:
        if self.enabled:
            self.progress.console.print(f"layer {layer + 1:>{len(str(self.total))}}/{self.total}  {text}")

    def stage(self, layer: int, what: str) -> None:
        self.progress.update(self.task, description=f"layer {layer + 1}/{self.total} · {what}")

    def module(self, layer: int, total: int, name: str, seconds: float, loss: float | None) -> None:
        """A quantized module of 0-based ``layer`` (``total`` layers); ``loss`` None for RTN."""
        if loss is not None:
            self.losses.append(loss)
        if self.verbose:
            self._print(layer, f"{name:<22} {seconds:6.2f}s" + ("" if loss is None else f"  loss {loss:.4g}"))

    def note(self, layer: int, total: int, text: str) -> None:
        """Per-layer detail (e.g. AWQ's chosen scales): shown with ``verbose``, else summarised."""
        if self.verbose:
            self._print(layer, text)
        self.notes.append(text.split(" ", 1)[0])

    def layer_done(self, layer: int | None = None) -> None:
        """Advance the bar; with ``layer`` (0-based, a layer just quantized) print its line."""
        if layer is not None:
            seconds = time.perf_counter() - self.started
            loss = f"  GPTQ loss Σ {sum(self.losses):.4g}" if self.losses else ""
            steps = "".join(f" {n}" for n in self.notes)
            self._print(layer, f"{seconds:6.1f}s{steps}{loss}")
        self.progress.advance(self.task)
        self._reset()


class WindowProgress:
    """A bar over evaluation windows with the running perplexity."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.progress = _bar("evaluating", enabled)
        self.task = self.progress.add_task("", total=total)

    def __enter__(self) -> "WindowProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def window_done(self, running_ppl: float) -> None:
        self.progress.update(self.task, advance=1, description=f"running ppl {running_ppl:.4f}")
