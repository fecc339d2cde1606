"""The server's counters, as Prometheus' text exposition format (GET /metrics); no client library needed."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return [*rows, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]


class ServerMetrics:
    """Requests by model and status, request latency, batch sizes; swap figures come from `ServedModels`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.inputs: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)

    def request(self, model: str, status: int, seconds: float, inputs: int = 0) -> None:
        with self.lock:
            self.requests[(model, status)] += 1
            self.inputs[model] += inputs
            self.latency.observe(seconds)

    def generated(self, model: str, tokens: int) -> None:
        with self.lock:
            self.tokens[model] += tokens

    def batch(self, size: int) -> None:
        with self.lock:
            self.batch_sizes.observe(size)

    def render(self, served, queued: int) -> str:
        """The exposition text; `served` is the `ServedModels` whose swaps and memory it reports,
        `queued` the inputs waiting in the scheduler."""
        with self.lock:
            lines = ["# HELP sparta_requests_total Requests by model and HTTP status.", "# TYPE sparta_requests_total counter"]
            lines += [f'sparta_requests_total{{model="{model}",status="{status}"}} {count}'
                      for (model, status), count in sorted(self.requests.items())]
            lines += ["# HELP sparta_inputs_total Inputs answered (texts classified, prompts completed), by model.",
                      "# TYPE sparta_inputs_total counter"]
            lines += [f'sparta_inputs_total{{model="{model}"}} {count}' for model, count in sorted(self.inputs.items())]
            lines += ["# HELP sparta_generated_tokens_total Tokens generated, by model.", "# TYPE sparta_generated_tokens_total counter"]
            lines += [f'sparta_generated_tokens_total{{model="{model}"}} {count}' for model, count in sorted(self.tokens.items())]
            lines += ["# HELP sparta_request_latency_seconds Time from a request's arrival to its answer.",
                      "# TYPE sparta_request_latency_seconds histogram", *self.latency.lines("sparta_request_latency_seconds")]
            lines += ["# HELP sparta_batch_size Inputs per model forward.", "# TYPE sparta_batch_size histogram",
                      *self.batch_sizes.lines("sparta_batch_size")]
        lines += ["# HELP sparta_queued_inputs Inputs waiting for a batch.", "# TYPE sparta_queued_inputs gauge",
                  f"sparta_queued_inputs {queued}",
                  "# HELP sparta_adapter_swaps_total Adapter activations (revert one, apply another).",
                  "# TYPE sparta_adapter_swaps_total counter", f"sparta_adapter_swaps_total {served.swaps}",
                  "# HELP sparta_adapter_swap_seconds_total Time spent swapping adapters.",
                  "# TYPE sparta_adapter_swap_seconds_total counter", f"sparta_adapter_swap_seconds_total {served.swap_seconds:.6f}",
                  "# HELP sparta_mixed_batches_total Forwards over several adapters' inputs (the base's weights, each row's delta).",
                  "# TYPE sparta_mixed_batches_total counter", f"sparta_mixed_batches_total {served.mixed_batches}",
                  "# HELP sparta_base_bytes Bytes of the one base model's weights.", "# TYPE sparta_base_bytes gauge",
                  f"sparta_base_bytes {served.base_bytes}",
                  "# HELP sparta_adapter_resident_bytes Bytes each adapter keeps resident (indices, deltas, head).",
                  "# TYPE sparta_adapter_resident_bytes gauge"]
        lines += [f'sparta_adapter_resident_bytes{{model="{name}"}} {entry.swap.nbytes}'
                  for name, entry in served.entries.items() if entry.swap]
        return "\n".join(lines) + "\n"
