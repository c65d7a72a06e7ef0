"""Wall time and peak memory of each stage of a job."""
from __future__ import annotations

import time

from depgraph_llm.job.stage_memory import peak_gpu_bytes, peak_rss, reset_gpu_peak, reset_peak


class StageTimer:
    """Wall time, peak RSS and (with a GPU) peak GPU allocation of each stage (`with timer("name"): ...`)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self.gpu_peaks: dict[str, int] = {}

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                reset_peak()
                reset_gpu_peak()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.start, 3)
                timer.peaks[name] = max(timer.peaks.get(name, 0), peak_rss())
                gpu = peak_gpu_bytes()
                if gpu is not None:
                    timer.gpu_peaks[name] = max(timer.gpu_peaks.get(name, 0), gpu)

        return _Span()
