"""Test helpers for serving: TorchServe's worker wire format, the handler inside TorchServe's worker
machinery, and a real TorchServe on free local ports.

The wire helpers let handler tests go through TorchServe's own request decoding (`ts.protocol`) and
read its responses back, intermediate (streamed) ones included, without the Java frontend.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol.otf_message_handler import _retrieve_inference_msg
from ts.service import Service

from handler.mixtral_handler import MixtralHandler

TS_METRICS_CONFIG = Path(sys.modules["ts"].__file__).parent / "configs" / "metrics.yaml"
Body = dict[str, Any] | list[Any] | bytes

# ---------------------------------------------------------------------------------------------------
# The frontend <-> worker protocol.


def _frame(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def encode_inference_batch(bodies: Iterable[tuple[bytes, str]]) -> bytes:
    """What the frontend sends a worker for a batch of (body, content type) requests, minus the command
    byte: request ids req-0, req-1, ..., no headers, each body as the parameter `body`."""
    message = b""
    for index, (body, content_type) in enumerate(bodies):
        message += _frame(f"req-{index}".encode()) + struct.pack("!i", -1)  # id, no headers
        message += _frame(b"body") + _frame(content_type.encode()) + _frame(body) + struct.pack("!i", -1)
    return message + struct.pack("!i", -1)


class _ByteConnection:
    """Enough of a socket for `ts.protocol` to read a message from bytes."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def recv(self, size: int) -> bytes:
        return self._stream.read(size)


def decode_inference_batch(data: bytes) -> list[dict]:
    """The batch as TorchServe's worker decodes it (JSON bodies parsed, text bodies as str)."""
    return _retrieve_inference_msg(_ByteConnection(data))


@dataclass
class Response:
    request_id: str
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def stream_next(self) -> bool:
        return self.headers.get("ts_stream_next") == "true"


def decode_predict_responses(data: bytes) -> list[list[Response]]:
    """Split a worker's output (intermediate and final messages back to back) into messages."""
    stream = io.BytesIO(data)

    def read_int() -> int:
        return struct.unpack("!i", stream.read(4))[0]

    def read_bytes() -> bytes:
        return stream.read(read_int())

    messages: list[list[Response]] = []
    while stream.tell() < len(data):
        read_int()  # batch status code
        read_bytes()  # batch message
        responses = []
        while (length := read_int()) != -1:
            request_id = stream.read(length).decode()
            content_type = read_bytes().decode()
            status = read_int()
            read_bytes()  # reason phrase
            headers = {read_bytes().decode(): read_bytes().decode() for _ in range(read_int())}
            responses.append(Response(request_id, status, content_type, headers, read_bytes()))
        messages.append(responses)
    return messages


class RecordingSocket:
    """Stands in for the worker's socket to the frontend: keeps what the handler streams."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent += data


# ---------------------------------------------------------------------------------------------------
# The handler as TorchServe's Python worker runs it.


def make_model_dir(root: Path, converted_dir: Path, batch_size: int = 4, max_seq_len: int = 128,
                   **handler: Any) -> Path:
    """A model directory as scripts/build_archive.py lays it out, on the CPU."""
    checkpoints = root / "checkpoints" / "tiny"
    checkpoints.mkdir(parents=True)
    for name in ("model.pth", "model_int8.pth", "config.json", "tokenizer.model"):
        os.link(converted_dir / name, checkpoints / name)
    config = {"batchSize": batch_size, "deviceType": "cpu",
              "handler": {"converted_ckpt_dir": "checkpoints/tiny/model.pth", "compile": False,
                          "max_new_tokens": 20, "max_seq_len": max_seq_len, **handler}}
    (root / "model_config.yaml").write_text(yaml.safe_dump(config))
    return root


class Worker:
    """A handler as TorchServe's Python worker runs it: loaded through Service, fed decoded batches."""

    def __init__(self, model_dir: Path, batch_size: int = 4) -> None:
        manifest = {"model": {"modelName": "tiny", "modelVersion": "1.0", "handler": "mixtral_handler.py",
                              "configFile": "model_config.yaml"}}
        metrics = MetricsCacheYamlImpl(config_file_path=str(TS_METRICS_CONFIG))
        metrics.initialize_cache()
        metrics.model_name = "tiny"
        self.handler = MixtralHandler()
        self.service = Service("tiny", str(model_dir), manifest, self.handler.handle, None, batch_size,
                               metrics_cache=metrics)
        self.socket = RecordingSocket()
        self.service.set_cl_socket(self.socket)
        self.handler.initialize(self.service.context)

    def predict(self, *bodies: Body, content_type: str = "application/json"
                ) -> tuple[list[Response], list[list[Response]]]:
        """Send one batch; return the final responses and the streamed (intermediate) messages.

        Under torchrun (LOCAL_RANK set and not 0) TorchServe's worker sends nothing back: both are empty.
        """
        raw = [(body if isinstance(body, bytes) else json.dumps(body).encode(), content_type)
               for body in bodies]
        batch = decode_inference_batch(encode_inference_batch(raw))
        self.socket.sent.clear()
        reply = self.service.predict(batch)
        if reply is None:  # what ts.service returns on a rank whose answer TorchServe does not send
            assert not self.socket.sent
            return [], []
        final = decode_predict_responses(bytes(reply))
        assert len(final) == 1
        return final[0], decode_predict_responses(bytes(self.socket.sent))

    def answer(self, body: Body) -> str:
        [response], _ = self.predict(body)
        assert response.status == 200, response.text
        return response.text


# ---------------------------------------------------------------------------------------------------
# A real TorchServe.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TorchServe:
    """One TorchServe (Java frontend and its Python workers) confined to `workdir`.

    TMPDIR points into `workdir`, so its pid file, worker sockets and unpacked models do not meet any
    other TorchServe on the machine; every process it starts carries `workdir` on its command line,
    which is how `leftover_processes` finds them.
    """

    workdir: Path
    model_store: Path
    models: list[str]
    inference_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.tmp = self.workdir / "tmp"
        self.logs = self.workdir / "logs"
        self.config = self.workdir / "config.properties"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.tmp), "TEMP": str(self.tmp), "LOG_LOCATION": str(self.logs),
                "METRICS_LOCATION": str(self.logs)}

    def start(self, timeout: float = 180.0) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config.write_text("\n".join([
            f"inference_address=http://127.0.0.1:{self.inference_port}",
            f"management_address=http://127.0.0.1:{self.management_port}",
            f"metrics_address=http://127.0.0.1:{self.metrics_port}",
            # Custom handler metrics reach the metrics endpoint only in prometheus mode, and only
            # when declared in a metrics config or auto-detected.
            "metrics_mode=prometheus",
            "model_metrics_auto_detect=true",
            "disable_system_metrics=true",
            f"initial_worker_port={free_port()}",
            "default_workers_per_model=1",
            "",
        ]))
        with (self.workdir / "torchserve_start.log").open("w") as start_log:
            subprocess.run(
                ["torchserve", "--start", "--ncs", "--disable-token-auth", "--ts-config", str(self.config),
                 "--model-store", str(self.model_store), "--models", *[f"{m}={m}" for m in self.models]],
                cwd=self.workdir, env=self._env(), check=True, timeout=60, stdout=start_log,
                stderr=subprocess.STDOUT)
        self.wait_until_ready(timeout)

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.models)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"models {sorted(pending)} not ready after {timeout:.0f} s\n{self.log_tail()}")
            if not self.leftover_processes():
                raise RuntimeError(f"TorchServe exited during start-up\n{self.log_tail()}")
            for model in list(pending):
                try:
                    reply = requests.get(f"{self.management_url}/models/{model}", timeout=5)
                except requests.ConnectionError:
                    break
                workers = reply.json()[0].get("workers", []) if reply.ok else []
                if workers and all(worker["status"] == "READY" for worker in workers):
                    pending.discard(model)
            time.sleep(0.5)

    def worker_pids(self, model: str) -> list[int]:
        reply = requests.get(f"{self.management_url}/models/{model}", timeout=10)
        reply.raise_for_status()
        return [worker["pid"] for worker in reply.json()[0]["workers"]]

    def log_tail(self, lines: int = 80) -> str:
        parts = []
        for name in ("torchserve_start.log", "logs/ts_log.log", "logs/model_log.log"):
            path = self.workdir / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"----- {name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(parts)

    def leftover_processes(self) -> list[psutil.Process]:
        """This instance's processes: the frontend and its workers, found by our directories."""
        marks = (str(self.workdir), str(self.model_store))
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.pid != os.getpid() and any(mark in cmdline for mark in marks):
                found.append(process)
        return found

    def stop(self, timeout: float = 60.0) -> list[str]:
        """`torchserve --stop`, then wait for every process of this instance to end. Returns the
        command lines of processes that had to be killed (empty when the stop was clean)."""
        subprocess.run(["torchserve", "--stop"], cwd=self.workdir, env=self._env(), timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        deadline = time.monotonic() + timeout
        while (left := self.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.5)
        killed = []
        for process in left:  # only ours, by pid: a stuck stop must not leak processes into later tests
            try:
                killed.append(" ".join(process.cmdline()))
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return killed

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
