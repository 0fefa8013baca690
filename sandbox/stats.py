"""Window counts over the sandbox's request log: the witness of how fast a provider was called.

Every entry of ``SandboxState.request_log`` (``/_sandbox/stats?log=1``) carries its arrival
time ``t`` (``time.time()``, taken under the state lock, so the log is in arrival order).
These functions take the sorted arrival times of the requests of interest, e.g.
``sorted(e["t"] for e in log if e["path"] == "/v1/payment_intents")``, and count them the
way the sandbox's own rate limit does: over sliding windows ``[t, t + window_s)``.

The busiest window can always be slid to start at an arrival, so checking the windows that
start at an arrival is exhaustive.
"""

from __future__ import annotations

from collections.abc import Sequence


def max_in_window(times: Sequence[float], window_s: float = 1.0) -> int:
    """Highest number of (sorted) arrivals in any window ``[t, t + window_s)``; 0 for none."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def windows_over(times: Sequence[float], limit: int, window_s: float = 1.0) -> int:
    """Number of (sorted) arrivals ``t`` whose window ``[t, t + window_s)`` holds more than
    ``limit`` arrivals; 0 means no window anywhere exceeded ``limit``."""
    over, end = 0, 0
    for start, t in enumerate(times):
        end = max(end, start)
        while end < len(times) and times[end] - t < window_s:
            end += 1
        if end - start > limit:
            over += 1
    return over
