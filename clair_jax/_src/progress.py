"""A small text progress bar (no dependency), drawn on a terminal and in notebooks.

On a terminal the bar is redrawn in place with a carriage return. In a Jupyter
or Colab notebook, where ``sys.stderr`` is not a terminal and a carriage return
is not reliably honoured, the bar is one display output updated in place
(``IPython.display`` with a ``display_id``, no widget library needed).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Jupyter, JupyterLab, Colab, VS Code notebooks)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except AttributeError:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


class ProgressBar:
    """``desc [#########.........] 3/10 0:05<0:12 key=value``, redrawn in place.

    Args:
      total: number of steps.
      desc: label printed before the bar.
      enabled: draw the bar; ``None`` draws it when ``stream`` is a TTY or, with
        no ``stream`` given, in a notebook.
      stream: where to draw (default ``sys.stderr``; in a notebook, with no
        ``stream`` given, a display output of the cell).
      width: characters of the bar itself.

    Examples:
      >>> import io
      >>> out = io.StringIO()
      >>> with ProgressBar(2, desc="rounds", enabled=True, stream=out) as bar:
      ...     bar.update(loss=0.5)
      ...     bar.update(loss=0.25)
      >>> "2/2" in out.getvalue() and "loss=0.25" in out.getvalue()
      True
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        enabled: bool | None = None,
        stream: TextIO | None = None,
        width: int = 24,
    ):
        self.total = max(int(total), 0)
        self.desc = desc
        notebook = stream is None and in_notebook()
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = notebook or bool(isatty and isatty())
        self.enabled = enabled
        self._display: Any = None  # the notebook display handle, once shown
        self._notebook = notebook and enabled
        self.width = width
        self.count = 0
        self.start = time.perf_counter()
        self._last_len = 0

    @staticmethod
    def _clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def update(self, n: int = 1, **postfix) -> None:
        """Advances by ``n`` steps and redraws, with ``key=value`` pairs after the bar."""
        self.count += n
        if not self.enabled:
            return
        done = min(self.count, self.total)
        filled = int(self.width * done / self.total) if self.total else self.width
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / done * (self.total - done) if done else 0.0
        extras = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items()
        )
        line = (
            f"{self.desc} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
            f"{self._clock(elapsed)}<{self._clock(remaining)} {extras}"
        ).rstrip()
        if self._notebook:
            self._show(line)
            return
        pad = " " * max(self._last_len - len(line), 0)
        self._last_len = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def _show(self, line: str) -> None:
        """Shows ``line`` as the cell's display output, updated in place."""
        from IPython.display import display

        if self._display is None:
            self._display = display({"text/plain": line}, raw=True, display_id=True)
        else:
            self._display.update({"text/plain": line}, raw=True)

    def close(self) -> None:
        """Ends the line."""
        if self.enabled and not self._notebook and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
