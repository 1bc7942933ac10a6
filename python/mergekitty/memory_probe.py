"""Measure a process's peak anonymous memory while something runs (Linux: /proc/self/status).

Used by the tests and benches that check ``memory.estimate`` against what the executor really
allocates. The kernels release the interpreter, so a sampling thread sees their buffers.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
_ANON = re.compile(r"RssAnon:\s+(\d+) kB")


def anonymous_bytes() -> int:
    """This process's resident anonymous memory now."""
    with open("/proc/self/status") as f:
        found = _ANON.search(f.read())
    return int(found.group(1)) * 1024 if found else 0


def peak_anonymous_bytes(run: Callable[[], T], interval_s: float = 0.0005) -> tuple[T, int, int]:
    """Run ``run()``; returns (its result, anonymous bytes before, peak anonymous bytes during)."""
    before = anonymous_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anonymous_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run()
    finally:
        done.set()
        sampler.join()
    return result, before, max(peak, anonymous_bytes())
