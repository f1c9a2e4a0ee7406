"""A GPU's power draw, SM clock and clock-limit reasons, sampled by `nvidia-smi` while a benchmark runs.

Why it matters: a sustained int8 decode of Mixtral-8x7B draws an H200 to its 700 W board limit, and the
driver then lowers the SM clock (session 22: one board held ~1950 MHz there, another fell to 1400-1950).
The memory-bound expert kernels hardly notice; the latency-bound ones (attention, router, the small
linears' ramp-up) slow with the clock, so the same code measured 276 tok/s on one board and 263-270 on
another, and the first of several back-to-back runs often came out faster than the rest. A result that
records the power and the clock it ran at can be compared; one that does not cannot.

nvidia-smi (part of the driver) is used instead of NVML bindings so that nothing needs installing. Where
it is missing or fails, `GpuTelemetry.start` returns a sampler whose summary says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# NVML's clock event ("throttle") reason bits, as nvidia-smi prints them in hex.
SW_POWER_CAP = 0x4
HW_SLOWDOWN = 0x8
SW_THERMAL = 0x20
HW_THERMAL = 0x40
HW_POWER_BRAKE = 0x80
THERMAL = SW_THERMAL | HW_THERMAL
HARDWARE = HW_SLOWDOWN | HW_POWER_BRAKE

# Drivers from 535 on name the reasons field clocks_event_reasons; older ones clocks_throttle_reasons.
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
FIELDS = ("timestamp", "power.draw", "power.limit", "clocks.sm", "clocks.max.sm")
TIMESTAMP_FORMAT = "%Y/%m/%d %H:%M:%S"


@dataclass
class Sample:
    time: float  # seconds since the epoch (time.time())
    power_w: float
    power_limit_w: float
    sm_clock_mhz: float
    sm_clock_max_mhz: float
    reasons: int


def parse_timestamp(text: str) -> float:
    """nvidia-smi's local-time stamp ('2026/11/23 00:47:20.707') as time.time() seconds."""
    whole, _, fraction = text.strip().partition(".")
    return time.mktime(time.strptime(whole, TIMESTAMP_FORMAT)) + (float(f"0.{fraction}") if fraction else 0.0)


def parse_samples(text: str) -> list[Sample]:
    """The lines of `nvidia-smi --query-gpu=<FIELDS>,<reasons> --format=csv,noheader,nounits`; lines with
    a field the GPU does not report ('[N/A]', 'Not Supported') or cut short are skipped."""
    samples = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != len(FIELDS) + 1:
            continue
        try:
            samples.append(Sample(parse_timestamp(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]),
                                  float(parts[4]), int(parts[5], 16)))
        except ValueError:
            continue
    return samples


def summarize(samples: list[Sample]) -> dict:
    """Mean power and SM clock, the lowest clock, and the share of samples with each kind of limit."""
    if not samples:
        return {"samples": 0}

    def share(bits: int) -> float:
        return round(sum(1 for s in samples if s.reasons & bits) / len(samples), 2)

    return {
        "samples": len(samples),
        "power_w": round(statistics.fmean(s.power_w for s in samples), 1),
        "power_limit_w": round(max(s.power_limit_w for s in samples), 1),
        "sm_clock_mhz": round(statistics.fmean(s.sm_clock_mhz for s in samples)),
        "sm_clock_min_mhz": round(min(s.sm_clock_mhz for s in samples)),
        "sm_clock_max_mhz": round(max(s.sm_clock_max_mhz for s in samples)),
        "power_capped_share": share(SW_POWER_CAP),
        "thermal_share": share(THERMAL),
        "hw_slowdown_share": share(HARDWARE),
    }


def query_command(gpu: str, reason_field: str, interval_ms: int | None) -> list[str]:
    command = ["nvidia-smi", f"--query-gpu={','.join((*FIELDS, reason_field))}", "--format=csv,noheader,nounits",
               "-i", gpu]
    return command + ["-lms", str(interval_ms)] if interval_ms else command


@dataclass
class GpuTelemetry:
    """Samples one GPU every `interval_ms` from start() to stop(); window() marks spans (e.g. each timed
    run) whose samples summary() reports one by one. The driver averages power.draw over a short window of
    its own, so a span should last several intervals."""

    gpu: str
    interval_ms: int = 100
    error: str | None = None
    samples: list[Sample] = field(default_factory=list, init=False)  # read by stop()
    _process: subprocess.Popen | None = field(default=None, init=False)
    _log: Path | None = field(default=None, init=False)
    _windows: list[tuple[float, float]] = field(default_factory=list, init=False)
    _started: float = field(default=0.0, init=False)
    _stopped: float = field(default=0.0, init=False)

    @classmethod
    def start(cls, gpu: str, interval_ms: int = 100) -> GpuTelemetry:
        """Start sampling `gpu` (an nvidia-smi -i id: index, UUID or PCI bus id)."""
        telemetry = cls(gpu, interval_ms)
        if shutil.which("nvidia-smi") is None:
            telemetry.error = "nvidia-smi is not on PATH"
            return telemetry
        reason_field = telemetry._reason_field()
        if reason_field is None:
            return telemetry
        handle, name = tempfile.mkstemp(prefix="gpu_telemetry_", suffix=".csv")
        os.close(handle)
        telemetry._log = Path(name)
        with telemetry._log.open("w") as log:
            telemetry._process = subprocess.Popen(query_command(gpu, reason_field, interval_ms), stdout=log,
                                                  stderr=subprocess.DEVNULL)
        telemetry._started = time.time()
        return telemetry

    def _reason_field(self) -> str | None:
        """The reasons field this driver knows, from a one-off query; None (with `error`) if none works."""
        for reason_field in REASON_FIELDS:
            try:
                result = subprocess.run(query_command(self.gpu, reason_field, None), capture_output=True,
                                        text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.error = f"nvidia-smi failed: {exc}"
                return None
            if result.returncode == 0 and parse_samples(result.stdout):
                self.error = None
                return reason_field
            self.error = f"nvidia-smi -i {self.gpu}: {(result.stdout + result.stderr).strip()[:200]}"
        return None

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        """`with telemetry.window(): ...` records the span of the block."""
        start = time.time()
        try:
            yield
        finally:
            self._windows.append((start, time.time()))

    def stop(self) -> None:
        """End the sampling; its samples move from the temporary file to `samples`."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._stopped = self._stopped or time.time()
        if self._log is not None:
            self.samples = parse_samples(self._log.read_text()) if self._log.exists() else []
            self._log.unlink(missing_ok=True)
            self._log = None

    def summary(self) -> dict:
        """Over all windows together (or the whole sampling time if none was marked), plus each window's
        own summary under 'windows'. Call after stop()."""
        if self.error is not None:
            return {"source": "nvidia-smi", "error": self.error}
        windows = self._windows or [(self._started, self._stopped or time.time())]
        inside = [[s for s in self.samples if start <= s.time <= end] for start, end in windows]
        result = {"source": "nvidia-smi", "gpu": self.gpu, "interval_ms": self.interval_ms,
                  **summarize([s for window in inside for s in window])}
        if self._windows:
            result["windows"] = [summarize(window) for window in inside]
        return result


def gpu_id(device: object) -> str:
    """The nvidia-smi id of a torch CUDA device: its UUID, which stays right under CUDA_VISIBLE_DEVICES
    (where torch's index and nvidia-smi's differ); the index where torch does not give the UUID."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    uuid = str(getattr(properties, "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    return str(torch.device(device).index or 0)
