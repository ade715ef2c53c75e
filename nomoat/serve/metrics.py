"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: a few counters, two gauges and
one histogram need no client library. Updated from the engine thread and the event loop, hence the lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque

# Time-to-first-token buckets in seconds: from one fast step to a long wait in the queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW_S seconds
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.queue_depth = 0
        self.running = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def count_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.tokens += n
            self.recent.append((now, n))
            self._forget(now)

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft_sum += seconds
            self.ttft_counts[next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))] += 1

    def set_load(self, queue_depth: int, running: int) -> None:
        with self.lock:
            self.queue_depth, self.running = queue_depth, running

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self.lock:
            self._forget(now)
            return sum(n for _, n in self.recent) / RATE_WINDOW_S

    def _forget(self, now: float) -> None:
        """Drop counts older than the rate window, so that memory stays bounded without a scraper."""
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def render(self) -> str:
        rate = self.tokens_per_s()
        with self.lock:
            lines = [
                "# HELP nomoat_requests_total HTTP requests answered, by endpoint and status code.",
                "# TYPE nomoat_requests_total counter",
            ]
            lines += [
                f'nomoat_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP nomoat_generated_tokens_total Tokens generated for all requests.",
                "# TYPE nomoat_generated_tokens_total counter",
                f"nomoat_generated_tokens_total {self.tokens}",
                f"# HELP nomoat_tokens_per_second Tokens generated per second over the last {RATE_WINDOW_S:g} s.",
                "# TYPE nomoat_tokens_per_second gauge",
                f"nomoat_tokens_per_second {rate:.3f}",
                "# HELP nomoat_queue_depth Sequences waiting for a slot in the running batch.",
                "# TYPE nomoat_queue_depth gauge",
                f"nomoat_queue_depth {self.queue_depth}",
                "# HELP nomoat_running_sequences Sequences in the running batch.",
                "# TYPE nomoat_running_sequences gauge",
                f"nomoat_running_sequences {self.running}",
                "# HELP nomoat_time_to_first_token_seconds From a request's arrival to its first token.",
                "# TYPE nomoat_time_to_first_token_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip((*TTFT_BUCKETS, float("inf")), self.ttft_counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'nomoat_time_to_first_token_seconds_bucket{{le="{le}"}} {cumulative}')
            lines += [
                f"nomoat_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"nomoat_time_to_first_token_seconds_count {cumulative}",
            ]
        return "\n".join(lines) + "\n"
