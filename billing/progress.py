"""Progress output for long commands: a bar with rate and ETA on a terminal, lines otherwise.

CI logs and cron mails get a plain line every ``every_seconds`` instead of carriage-return
noise; a person at a terminal gets tqdm.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


class Progress:
    def __init__(self, *, total: int | None, desc: str, stream: TextIO | None = None, every_seconds: float = 5.0):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.every = total, desc, every_seconds
        self.done = 0
        self.started = self._last = time.monotonic()
        self._bar = tqdm(total=total, desc=desc, file=self.stream, unit="row") if self.stream.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate else float("inf")
            return f"{self.desc}: {self.done}/{self.total} ({rate:,.0f}/s, ETA {eta:,.0f} s)"
        return f"{self.desc}: {self.done} ({rate:,.0f}/s)"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self.stream.write(self.line() + " done\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], *, total: int | None, desc: str, stream: TextIO | None = None) -> Iterator[T]:
    with Progress(total=total, desc=desc, stream=stream) as progress:
        for item in items:
            yield item
            progress.update()
