"""gpt_fast_mixtral.gpu_telemetry: parsing nvidia-smi's samples, and the sampler run against a stand-in
nvidia-smi on PATH (the CPU machines have no driver); the benchmark's summary line that reports it."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from gpt_fast_mixtral import gpu_telemetry
from gpt_fast_mixtral.gpu_telemetry import GpuTelemetry, parse_samples, parse_timestamp, summarize


def stamp(seconds: float) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(seconds)) + f".{int(seconds % 1 * 1000):03d}"


def test_timestamps_are_read_as_local_time_with_milliseconds() -> None:
    now = round(time.time(), 3)
    assert parse_timestamp(stamp(now)) == pytest.approx(now, abs=2e-3)


def test_samples_skip_unreported_fields_and_summarise_the_limits() -> None:
    t = stamp(time.time())
    text = "\n".join([
        f"{t}, 346.50, 700.00, 1980, 1980, 0x0000000000000000",
        f"{t}, 698.00, 700.00, 1395, 1980, 0x0000000000000004",
        f"{t}, [N/A], 700.00, 1980, 1980, 0x0000000000000000",  # a field the board does not report
        f"{t}, 700.00, 700.00, 1605, 1980, 0x0000000000000044",  # power cap and hardware thermal
        f"{t}, 699.00, 700.00",  # cut short when the sampler stopped
    ])
    samples = parse_samples(text)
    assert [s.power_w for s in samples] == [346.5, 698.0, 700.0]
    summary = summarize(samples)
    assert summary == {
        "samples": 3, "power_w": 581.5, "power_limit_w": 700.0, "sm_clock_mhz": 1660, "sm_clock_min_mhz": 1395,
        "sm_clock_max_mhz": 1980, "power_capped_share": 0.67, "thermal_share": 0.33, "hw_slowdown_share": 0.0,
    }
    assert summarize([]) == {"samples": 0}


FAKE_SMI = """\
#!{python}
# Stands in for nvidia-smi: answers --query-gpu for GPU {gpu!r} only; with -lms, one line per interval
# until killed, the power-cap bit on every other line.
import sys, time
args = sys.argv[1:]
query = next(a for a in args if a.startswith("--query-gpu="))
if {old_driver} and "clocks_event_reasons" in query:
    print('Field "clocks_event_reasons.active" is not a valid field to query.')
    sys.exit(2)
if args[args.index("-i") + 1] != {gpu!r}:
    print("No devices were found")
    sys.exit(6)
interval = int(args[args.index("-lms") + 1]) / 1000 if "-lms" in args else None
n = 0
while True:
    now = time.time()
    reasons = 4 if n % 2 else 0
    print(time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + ".%03d" % int(now % 1 * 1000)
          + ", %.2f, 700.00, %d, 1980, 0x%016x" % (650 + 50 * (n % 2), 1980 - 300 * (n % 2), reasons), flush=True)
    n += 1
    if interval is None:
        break
    time.sleep(interval)
"""


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch):
    def install(gpu: str = "GPU-1234", old_driver: bool = False) -> None:
        script = tmp_path / "nvidia-smi"
        script.write_text(FAKE_SMI.format(python=sys.executable, gpu=gpu, old_driver=old_driver))
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return install


@pytest.mark.parametrize("old_driver", [False, True], ids=["clocks_event_reasons", "clocks_throttle_reasons"])
def test_the_sampler_reports_each_window_from_nvidia_smi(fake_smi, old_driver: bool) -> None:
    fake_smi(old_driver=old_driver)
    telemetry = GpuTelemetry.start("GPU-1234", interval_ms=20)
    assert telemetry.error is None
    time.sleep(0.3)  # outside every window
    for _ in range(2):
        with telemetry.window():
            time.sleep(0.4)
    log = telemetry._log
    assert log is not None and log.exists()
    telemetry.stop()
    assert not log.exists() and telemetry.samples  # read into memory, the temporary file removed
    summary = telemetry.summary()
    assert telemetry.summary() == summary  # summarising again gives the same
    assert summary["gpu"] == "GPU-1234" and summary["source"] == "nvidia-smi"
    assert len(summary["windows"]) == 2
    for window in summary["windows"]:
        assert 5 <= window["samples"] <= 30  # ~20 at 20 ms; none of the 0.3 s before
        assert 0.2 <= window["power_capped_share"] <= 0.8
        assert window["sm_clock_min_mhz"] == 1680 and window["sm_clock_max_mhz"] == 1980
    assert summary["samples"] == sum(w["samples"] for w in summary["windows"])
    assert telemetry._process is not None and telemetry._process.poll() is not None  # stopped


def test_a_gpu_nvidia_smi_does_not_know_gives_its_message_not_samples(fake_smi) -> None:
    fake_smi(gpu="GPU-1234")
    telemetry = GpuTelemetry.start("GPU-9999", interval_ms=20)
    telemetry.stop()
    summary = telemetry.summary()
    assert summary == {"source": "nvidia-smi", "error": "nvidia-smi -i GPU-9999: No devices were found"}


def test_without_nvidia_smi_the_summary_says_so(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    telemetry = GpuTelemetry.start("0")
    with telemetry.window():
        pass
    telemetry.stop()
    assert telemetry.summary() == {"source": "nvidia-smi", "error": "nvidia-smi is not on PATH"}


def test_the_benchmark_summary_line_reports_power_and_clock() -> None:
    from test_benchmark import benchmark

    result = {"device": "NVIDIA H200", "world_size": 1, "parallel": "none", "decode_tok_s": 270.1,
              "share_of_ceiling": 0.81, "ceiling_tok_s": 333.0, "copy_bandwidth_tb_s": 4.27, "ttft_ms": {},
              "decode_gpu_telemetry": {"samples": 20, "power_w": 690.2, "power_limit_w": 700.0,
                                       "sm_clock_mhz": 1805, "sm_clock_max_mhz": 1980, "power_capped_share": 0.75}}
    options = type("Options", (), {"precision": "int8", "batch_size": 1})
    line = benchmark.summary_line(result, options)
    assert "during decode 690.2 W of 700.0, SM clock 1805 MHz (max 1980), power-capped in 75% of samples" in line
    result["decode_gpu_telemetry"] = {"source": "nvidia-smi", "error": "nvidia-smi is not on PATH"}
    assert "during decode" not in benchmark.summary_line(result, options)


def test_gpu_id_prefixes_torchs_uuid(monkeypatch) -> None:
    import torch

    class Properties:
        uuid = "58e0b6d0-1111-2222-3333-444455556666"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())
    assert gpu_telemetry.gpu_id(torch.device("cuda", 1)) == "GPU-58e0b6d0-1111-2222-3333-444455556666"
    Properties.uuid = ""
    assert gpu_telemetry.gpu_id(torch.device("cuda", 1)) == "1"

