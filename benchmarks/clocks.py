"""The GPU's SM clock and power while a benchmark runs, read by ``nvidia-smi`` (a query: nothing is set).

A run whose kernels keep the GPU at its power limit is not sped up by removing idle time between them: the driver
lowers the clock ("SW power cap") until the power fits, so the time follows the energy of the work. These samples
say whether that is happening:

    with ClockSampler() as clocks:
        run()
    print(clocks.summary())   # SM clock mean/min, the share of samples at the power cap, the power limit

Sample a run of its own, not one you time: a 32k prefill timed with nvidia-smi starting just before it took 1.13 and
1.61 s, against 0.90-0.97 s without (its start-up seems to hold up the GPU work of the sampling process).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

FIELDS = "timestamp,power.draw,power.limit,clocks.sm,clocks.max.sm,clocks_event_reasons.active"
SW_POWER_CAP = 0x4  # nvidia-smi's clock event reason: the clock is lowered to keep the board under its power limit


class ClockSampler:
    """Samples every ``interval_ms`` of the first GPU while the block runs; `summary` describes the samples taken
    inside it. Without samples (no nvidia-smi, or it stopped) `describe` says why."""

    def __init__(self, interval_ms: int = 20, gpu: int = 0) -> None:
        self.interval_ms = interval_ms
        self.gpu = gpu
        self.samples: list[dict] = []
        self._process = None
        self._file = None
        self._began = 0.0
        self.why_none = "no nvidia-smi on this machine"  # what `describe` says when there are no samples

    def __enter__(self) -> ClockSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self._file = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            ["nvidia-smi", f"--id={self.gpu}", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
             "-lms", str(self.interval_ms)], stdout=self._file, stderr=subprocess.PIPE, text=True)
        waited = time.perf_counter()
        # wait for its start-up (the first samples written), unless it stopped (an older driver lacks a field)
        while self._file.tell() == 0 and self._process.poll() is None and time.perf_counter() - waited < 5.0:
            time.sleep(0.05)
            self._file.seek(0, 2)
        self._began = time.time()
        return self

    def __exit__(self, *exc) -> None:
        if self._process is None:
            return
        ended = time.time()
        stopped = self._process.poll()
        if stopped is None:
            self._process.terminate()
        _, errors = self._process.communicate()
        self._file.seek(0)
        rows = [row for line in self._file if (row := _parse(line)) is not None]
        self.samples = [row for row in rows if self._began <= row["at"] <= ended]  # the block's own
        self._file.close()
        if stopped is not None:
            self.why_none = f"nvidia-smi stopped (exit {stopped}): {errors.strip()[:200]}"
        elif not self.samples:
            self.why_none = f"no sample inside the block ({len(rows)} outside it: shorter than {self.interval_ms} ms?)"

    def summary(self) -> dict:
        if not self.samples:
            return dict(samples=0)
        clocks = [s["sm_mhz"] for s in self.samples]
        capped = sum(bool(s["reasons"] & SW_POWER_CAP) for s in self.samples)
        return dict(samples=len(self.samples), sm_mhz_mean=sum(clocks) / len(clocks), sm_mhz_min=min(clocks),
                    sm_mhz_max_allowed=self.samples[0]["max_sm_mhz"], power_cap_share=capped / len(self.samples),
                    power_limit_w=self.samples[0]["power_limit_w"])

    def describe(self) -> str:
        s = self.summary()
        if not s["samples"]:
            return f"clocks: not sampled ({self.why_none})"
        return (f"SM clock mean {s['sm_mhz_mean']:.0f} MHz, min {s['sm_mhz_min']:.0f} "
                f"(of {s['sm_mhz_max_allowed']:.0f}); at the {s['power_limit_w']:.0f} W power cap in "
                f"{100 * s['power_cap_share']:.0f}% of {s['samples']} samples")


def _parse(line: str) -> dict | None:
    parts = [part.strip() for part in line.split(",")]
    try:
        stamp, fraction = parts[0].split(".")
        at = time.mktime(time.strptime(stamp, "%Y/%m/%d %H:%M:%S")) + float("0." + fraction)  # (local time)
        return dict(at=at, power_w=float(parts[1]), power_limit_w=float(parts[2]), sm_mhz=float(parts[3]),
                    max_sm_mhz=float(parts[4]), reasons=int(parts[5], 16))
    except (IndexError, ValueError):
        return None  # "[N/A]" fields, a cut-off last line
