"""Specifications for `gpt_fast_mixtral.download` and `scripts/download.py`.

No test reaches the internet. The offline cases read a Hugging Face cache laid out in a temporary directory
exactly as huggingface_hub writes it. The online cases talk, through huggingface_hub's real HTTP code, to a
small fake Hub on 127.0.0.1 that speaks the few endpoints a snapshot download uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save as safetensors_bytes

import gpt_fast_mixtral.download as download_module
from gpt_fast_mixtral.download import DownloadError, download, missing_files, select_files

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "scripts" / "download.py"
TEST_TIME_LIMIT_S = 30
GRANTED_TOKEN = "hf_granted"


# --------------------------------------------------------------------------------------------- repo contents
def shard(seed: int) -> bytes:
    return safetensors_bytes({f"layers.{seed}.weight": torch.full((4, 4), float(seed))})


def mixtral_repo_files() -> dict[str, bytes]:
    """A Mixtral-like repo: what the pipeline reads, and what a real repo carries besides."""
    index = {"metadata": {"total_size": 128}, "weight_map": {
        "layers.1.weight": "model-00001-of-00002.safetensors",
        "layers.2.weight": "model-00002-of-00002.safetensors",
    }}
    return {
        "config.json": json.dumps({"model_type": "mixtral", "hidden_size": 8}).encode(),
        "generation_config.json": b'{"bos_token_id": 1}',
        "tokenizer.model": bytes(range(256)) * 4,
        "tokenizer_config.json": b"{}",
        "model-00001-of-00002.safetensors": shard(1),
        "model-00002-of-00002.safetensors": shard(2),
        "model.safetensors.index.json": json.dumps(index).encode(),
        # Never wanted when safetensors exist:
        "pytorch_model.bin": b"pickled weights" * 100,
        "consolidated.00.pt": b"mistral weights" * 100,
        "consolidated-00001-of-00002.safetensors": b"mistral layout weights" * 100,
        "params.json": b'{"dim": 8}',
        "README.md": b"# tiny",
        ".gitattributes": b"*.safetensors filter=lfs",
        "original/consolidated.00.pth": b"llama-style sub-folder",
    }


WANTED_FROM_MIXTRAL_REPO = {
    "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
}


def consolidated_repo_files() -> dict[str, bytes]:
    """Mistral's original release: no safetensors, weights as consolidated.*.pt described by params.json."""
    return {
        "params.json": b'{"dim": 8, "moe": {"num_experts": 2}}',
        "tokenizer.model": b"sentencepiece",
        "consolidated.00.pt": b"first half" * 50,
        "consolidated.01.pt": b"second half" * 50,
        "README.md": b"# original",
    }


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".model"))


def etag(name: str, data: bytes) -> str:
    # As on the Hub: LFS files are named by their sha256, plain git files by their git blob id.
    return hashlib.sha256(data).hexdigest() if is_lfs(name) else git_blob_sha1(data)


def commit_sha(files: dict[str, bytes]) -> str:
    return hashlib.sha1(json.dumps(sorted(etag(n, d) for n, d in files.items())).encode()).hexdigest()


# ------------------------------------------------------------------------------------ Hugging Face cache
def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay out `files` in `cache` as huggingface_hub does: blobs, refs/main and symlinked snapshot files."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    sha = commit_sha(files)
    snapshot = repo_dir / "snapshots" / sha
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(sha)
    for name, data in files.items():
        blob = repo_dir / "blobs" / etag(name, data)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def checkpoint_contents(checkpoint_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in checkpoint_dir.iterdir() if not p.name.startswith(".")}


# ------------------------------------------------------------------------------------------- a fake Hub
@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = ""

    def __post_init__(self) -> None:
        self.sha = self.sha or commit_sha(self.files)


@dataclass
class FakeHub:
    """The Hub endpoints huggingface_hub 2.4 uses for a snapshot download, served from memory."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    missing_repo_status: int = 404  # the real Hub says 401 when no token was sent
    drop_first_get_of: set[str] = field(default_factory=set)  # cut these files mid-body, once
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def resolves(self, method: str | None = None) -> list[str]:
        """The files whose bytes or metadata were asked for, in order."""
        return [
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for verb, path, _ in self.requests
            if "/resolve/" in path and method in (None, verb)
        ]


class FakeHubHandler(BaseHTTPRequestHandler):
    server: _FakeHubServer

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self.answer(body=False)

    def do_GET(self) -> None:
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        hub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path, dict(self.headers)))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo_id, route, revision = "/".join(parts[2:4]), parts[4], parts[5]
            self.api(repo_id, route, revision)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self.error(404, "RepoNotFound", "Not found")

    def find(self, repo_id: str, revision: str) -> FakeRepo | None:
        hub = self.server.hub
        repo = hub.repos.get(repo_id)
        if repo is None:
            self.error(hub.missing_repo_status, "RepoNotFound", "Repository not found")
        elif revision not in ("main", repo.sha):
            self.error(404, "RevisionNotFound", "Invalid rev id")
            repo = None
        return repo

    def api(self, repo_id: str, route: str, revision: str) -> None:
        repo = self.find(repo_id, revision)
        if repo is None:
            return
        if route == "revision":  # model_info: metadata stays public for gated repos, as on the Hub
            payload: object = {
                "_id": repo.sha[:24], "id": repo_id, "sha": repo.sha, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False,
                "siblings": [
                    {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
                    for name, data in repo.files.items()
                ],
            }
        elif route == "tree":
            payload = [self.tree_entry(name, data) for name, data in repo.files.items()]
        else:
            self.error(404, "EntryNotFound", "Unknown route")
            return
        self.send_bytes(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body=True)

    @staticmethod
    def tree_entry(name: str, data: bytes) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
        if is_lfs(name):
            entry["lfs"] = {"oid": etag(name, data), "size": len(data), "pointerSize": 134}
        return entry

    def resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        hub = self.server.hub
        repo = self.find(repo_id, revision)
        if repo is None:
            return
        if repo.gated and self.headers.get("Authorization") != f"Bearer {GRANTED_TOKEN}":
            self.error(401, "GatedRepo", f"Access to model {repo_id} is restricted. Please log in.")
            return
        data = repo.files.get(filename)
        if data is None:
            self.error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.sha})
            return
        # The headers huggingface_hub reads in get_hf_file_metadata and http_get.
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if is_lfs(filename):
            headers |= {"X-Linked-Etag": f'"{etag(filename, data)}"', "X-Linked-Size": str(len(data))}
        start = 0
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes="):-1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if body and filename in hub.drop_first_get_of:
            hub.drop_first_get_of.discard(filename)
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])  # then hang up: the client sees a short body
            return
        self.send_bytes(206 if start else 200, data[start:], headers, body)

    def error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self.send_bytes(status, json.dumps({"error": message}).encode(), headers | (extra or {}), body=True)

    def send_bytes(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)


class _FakeHubServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    server = _FakeHubServer(("127.0.0.1", 0), FakeHubHandler)  # loopback only, any free port
    server.hub = FakeHub(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ isolation
@pytest.fixture(autouse=True)
def isolated_hub_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No test may see the developer's token, cache or offline setting, nor run unbounded."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    # huggingface_hub reads these environment variables once, at import: patch what it computed from them.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def out_of_time(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran past {TEST_TIME_LIMIT_S} s")

    if not hasattr(signal, "SIGALRM"):  # not on Windows; subprocesses still carry their own timeout
        yield
        return
    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(TEST_TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter, where huggingface_hub reads HF_* from the environment as users set it."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    child_env |= {"HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | env
    return subprocess.run(
        [sys.executable, str(CLI), *args], cwd=cwd, env=child_env, capture_output=True, text=True, timeout=25
    )


# ================================================================================== file selection
def test_safetensors_repos_give_config_tokenizer_shards_and_index_only() -> None:
    assert set(select_files(mixtral_repo_files())) == WANTED_FROM_MIXTRAL_REPO


def test_repos_without_safetensors_give_mistral_consolidated_weights_and_params() -> None:
    assert set(select_files(consolidated_repo_files())) == {
        "params.json", "tokenizer.model", "consolidated.00.pt", "consolidated.01.pt",
    }


def test_a_checkpoint_dir_is_complete_only_with_config_tokenizer_and_every_indexed_shard(tmp_path: Path) -> None:
    files = mixtral_repo_files()
    for name in WANTED_FROM_MIXTRAL_REPO - {"model-00002-of-00002.safetensors", "tokenizer.model"}:
        (tmp_path / name).write_bytes(files[name])
    assert missing_files(tmp_path) == ["tokenizer.model", "model-00002-of-00002.safetensors"]
    assert "config.json" in " ".join(missing_files(tmp_path / "empty"))


# ============================================================================ offline, from the cache
def test_offline_the_needed_files_come_from_the_shared_cache_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = mixtral_repo_files()
    write_hub_cache(Path(constants.HF_HUB_CACHE), "org/tiny-mixtral", files)
    go_offline(monkeypatch)

    target = download("org/tiny-mixtral", tmp_path / "ckpt")

    assert target == tmp_path / "ckpt"
    assert checkpoint_contents(target) == {name: files[name] for name in WANTED_FROM_MIXTRAL_REPO}
    # Real files, not links into a cache that `hf cache delete` may empty.
    assert not any(path.is_symlink() for path in target.iterdir())


def test_offline_a_repo_missing_from_the_cache_says_so_and_how_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_hub_cache(Path(constants.HF_HUB_CACHE), "org/other", mixtral_repo_files())
    go_offline(monkeypatch)

    with pytest.raises(DownloadError) as caught:
        download("org/tiny-mixtral", tmp_path / "ckpt")

    message = str(caught.value)
    assert "org/tiny-mixtral" in message and "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_offline_an_incomplete_cached_snapshot_names_the_missing_shard(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = mixtral_repo_files()
    snapshot = write_hub_cache(Path(constants.HF_HUB_CACHE), "org/tiny-mixtral", files)
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # as after an interrupted download
    go_offline(monkeypatch)

    with pytest.raises(DownloadError, match="model-00002-of-00002.safetensors.*run once with network access"):
        download("org/tiny-mixtral", tmp_path / "ckpt")


# ======================================================================== online, through the fake Hub
def test_a_download_fetches_only_what_the_pipeline_needs(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = mixtral_repo_files()
    fake_hub.repos["org/tiny-mixtral"] = FakeRepo(files)

    target = download("org/tiny-mixtral", tmp_path / "ckpt", endpoint=fake_hub.url)

    assert checkpoint_contents(target) == {name: files[name] for name in WANTED_FROM_MIXTRAL_REPO}
    assert set(fake_hub.resolves("GET")) == WANTED_FROM_MIXTRAL_REPO


def test_a_second_download_reuses_the_cache_and_then_works_offline(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = mixtral_repo_files()
    fake_hub.repos["org/tiny-mixtral"] = FakeRepo(files)
    download("org/tiny-mixtral", tmp_path / "first", endpoint=fake_hub.url)
    fake_hub.requests.clear()

    download("org/tiny-mixtral", tmp_path / "second", endpoint=fake_hub.url)
    assert fake_hub.resolves() == []  # finished files are never fetched twice

    go_offline(monkeypatch)
    fake_hub.requests.clear()
    download("org/tiny-mixtral", tmp_path / "third")
    assert fake_hub.requests == []
    assert checkpoint_contents(tmp_path / "third") == checkpoint_contents(tmp_path / "first")


def test_weights_share_the_cache_storage_while_small_files_are_private_copies(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = mixtral_repo_files()
    fake_hub.repos["org/tiny-mixtral"] = FakeRepo(files)
    monkeypatch.setattr(download_module, "_LINK_MIN_BYTES", 100)  # our shards are tiny: treat them as big
    target = download("org/tiny-mixtral", tmp_path / "ckpt", endpoint=fake_hub.url)
    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--tiny-mixtral" / "snapshots" / FakeRepo(files).sha

    assert os.path.samefile(target / "model-00001-of-00002.safetensors", snapshot / "model-00001-of-00002.safetensors")
    (target / "config.json").write_text("{}")  # someone edits the config in place
    assert (snapshot / "config.json").read_bytes() == files["config.json"]


def test_a_connection_cut_mid_file_is_resumed_where_it_stopped(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    files = mixtral_repo_files()
    fake_hub.repos["org/tiny-mixtral"] = FakeRepo(files)
    fake_hub.drop_first_get_of.add("tokenizer.model")
    # The hub resumes from the last chunk it wrote (10 MB by default); make chunks smaller than the cut.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 128)

    target = download("org/tiny-mixtral", tmp_path / "ckpt", endpoint=fake_hub.url)

    assert (target / "tokenizer.model").read_bytes() == files["tokenizer.model"]
    ranges = [h.get("Range") for verb, path, h in fake_hub.requests if verb == "GET" and "tokenizer.model" in path]
    assert ranges == [None, f"bytes={len(files['tokenizer.model']) // 2}-"]


def test_a_repo_without_safetensors_gives_params_and_consolidated_weights(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    files = consolidated_repo_files()
    fake_hub.repos["mistral/original"] = FakeRepo(files)

    target = download("mistral/original", tmp_path / "ckpt", endpoint=fake_hub.url)

    assert checkpoint_contents(target) == {name: data for name, data in files.items() if name != "README.md"}


def test_a_repo_that_is_not_a_usable_checkpoint_is_refused_before_fetching(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.repos["org/dense-gguf"] = FakeRepo({"config.json": b"{}", "model.gguf": b"gguf"})

    with pytest.raises(DownloadError, match="has no weights .*tokenizer.model"):
        download("org/dense-gguf", tmp_path / "ckpt", endpoint=fake_hub.url)
    assert fake_hub.resolves() == []


def llama_repo_files() -> dict[str, bytes]:
    """A usable-looking repo of a model the pipeline cannot serve: 14 GB of weights in the real one."""
    files = mixtral_repo_files()
    files["config.json"] = json.dumps({"model_type": "llama", "hidden_size": 8}).encode()
    return files


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"model_type": "mixtral", "quantization_config": {"quant_method": "gptq"}}, r"already quantized \(gptq\)"),
    ({"model_type": "mixtral", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_a_repo_of_a_model_the_pipeline_cannot_serve_is_refused_before_fetching_weights(
    fake_hub: FakeHub, tmp_path: Path, config: dict, expected: str
) -> None:
    files = {**mixtral_repo_files(), "config.json": json.dumps(config).encode()}
    fake_hub.repos["org/not-mixtral"] = FakeRepo(files)

    with pytest.raises(DownloadError, match=rf"org/not-mixtral cannot be used: .*{expected}") as caught:
        download("org/not-mixtral", tmp_path / "ckpt", endpoint=fake_hub.url)

    assert "\n" not in str(caught.value) and "check the repo id" in str(caught.value)
    assert set(fake_hub.resolves("GET")) <= {"config.json"}  # no weight, not even the tokenizer
    assert not (tmp_path / "ckpt").exists()


def test_a_dense_mistral_original_repo_is_refused_before_fetching_weights(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = {**consolidated_repo_files(), "params.json": b'{"dim": 8, "n_layers": 2}'}
    fake_hub.repos["mistral/dense"] = FakeRepo(files)

    with pytest.raises(DownloadError, match="mistral/dense cannot be used: .*no 'moe' section"):
        download("mistral/dense", tmp_path / "ckpt", endpoint=fake_hub.url)
    assert set(fake_hub.resolves("GET")) <= {"params.json"}


def test_offline_a_cached_repo_of_another_model_is_refused_without_placing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_hub_cache(Path(constants.HF_HUB_CACHE), "org/llama", llama_repo_files())
    go_offline(monkeypatch)

    with pytest.raises(DownloadError, match="org/llama cannot be used: .*model_type='llama'"):
        download("org/llama", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_gated_repo_without_access_says_to_accept_the_licence_and_pass_a_token(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    fake_hub.repos["mistralai/gated"] = FakeRepo(mixtral_repo_files(), gated=True)

    with pytest.raises(DownloadError) as caught:
        download("mistralai/gated", tmp_path / "ckpt", endpoint=fake_hub.url)

    message = str(caught.value)
    assert "gated" in message and "licence" in message and f"{fake_hub.url}/mistralai/gated" in message
    assert "--hf-token" in message and "HF_TOKEN" in message and "401" in message
    assert not (tmp_path / "ckpt").exists()


def test_a_gated_repo_downloads_once_the_token_has_access(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.repos["mistralai/gated"] = FakeRepo(mixtral_repo_files(), gated=True)

    target = download("mistralai/gated", tmp_path / "ckpt", hf_token=GRANTED_TOKEN, endpoint=fake_hub.url)

    assert set(checkpoint_contents(target)) == WANTED_FROM_MIXTRAL_REPO


@pytest.mark.parametrize("status", [404, 401])
def test_a_missing_repo_says_to_check_the_repo_id(fake_hub: FakeHub, tmp_path: Path, status: int) -> None:
    fake_hub.missing_repo_status = status

    with pytest.raises(DownloadError) as caught:
        download("org/no-such-model", tmp_path / "ckpt", endpoint=fake_hub.url)

    message = str(caught.value)
    assert "org/no-such-model" in message and "check the repo id" in message and f"HTTP {status}" in message
    if status == 401:  # what the Hub answers when no token was sent: the repo may just be private
        assert "HF_TOKEN" in message


def test_an_unreachable_hub_says_so_and_points_to_offline_mode(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(DownloadError) as caught:
        download("org/tiny-mixtral", tmp_path / "ckpt", endpoint=f"http://127.0.0.1:{closed_port}")

    message = str(caught.value)
    assert "cannot reach" in message and "HF_HUB_OFFLINE=1" in message


def test_too_little_disk_space_is_refused_before_any_file_is_fetched(
    fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_hub.repos["org/tiny-mixtral"] = FakeRepo(mixtral_repo_files())
    real_usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage._replace(free=300 * 10**6))

    with pytest.raises(DownloadError) as caught:
        download("org/tiny-mixtral", tmp_path / "ckpt", endpoint=fake_hub.url)

    message = str(caught.value)
    assert "not enough disk space" in message and "0.30 GB is free" in message and "GB headroom" in message
    assert fake_hub.resolves() == []
    assert not (tmp_path / "ckpt").exists()


# =================================================================================================== CLI
def test_cli_failure_is_one_line_on_stderr_with_a_non_zero_exit(fake_hub: FakeHub, tmp_path: Path) -> None:
    result = run_cli("--repo-id", "org/no-such-model", cwd=tmp_path, env={
        "HF_ENDPOINT": fake_hub.url, "HF_HOME": str(tmp_path / "hf_home"),
    })

    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: ") and "org/no-such-model" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_offline_fills_the_default_checkpoints_dir_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "hf_home" / "hub"
    write_hub_cache(cache, "org/tiny-mixtral", mixtral_repo_files())

    result = run_cli("--repo-id", "org/tiny-mixtral", cwd=tmp_path, env={
        "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
    })

    assert result.returncode == 0, result.stderr
    assert set(checkpoint_contents(tmp_path / "checkpoints" / "org" / "tiny-mixtral")) == WANTED_FROM_MIXTRAL_REPO

