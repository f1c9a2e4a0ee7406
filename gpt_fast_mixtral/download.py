"""Fetch a Mixtral checkpoint from the Hugging Face Hub into a plain directory for the convert step.

Files always land in the shared Hugging Face cache first; `checkpoint_dir` then gets hard links to the
weights (copies where a link is impossible) and private copies of the small files. Going through the cache
rather than `snapshot_download(local_dir=...)` buys three things: finished files are never fetched twice,
several checkpoint directories share one copy of the weights, and `HF_HUB_OFFLINE=1` works, because
huggingface_hub 2.4 resolves offline snapshots in cache mode only.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_token,
    hf_hub_download,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)

from gpt_fast_mixtral.config import check_hf_model_kind, check_mistral_model_kind

__all__ = ["DownloadError", "default_checkpoint_dir", "download", "missing_files", "select_files"]

logger = logging.getLogger(__name__)

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MISTRAL_PARAMS = "params.json"
# Not read by the pipeline today, but tiny and useful to whoever inspects the checkpoint directory.
OPTIONAL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
CONSOLIDATED_PATTERNS = ("consolidated.*.pt", "consolidated.*.pth")

_GB = 1e9
# Filesystems misbehave when nearly full and other processes write too, so a download may not use the
# last few percent of a disk.
_MIN_HEADROOM_BYTES = 1 * 10**9
_HEADROOM_FRACTION = 0.05
# huggingface_hub's HTTP client has no timeout by default: without one a black-holed network hangs forever.
_API_TIMEOUT_S = 60.0
# A hard link shares its bytes with the cache blob, so an in-place edit of the checkpoint's copy (vim does
# that to files with several links) would silently change the cache too. Only weights, which nobody edits
# and which are too big to copy, are linked; config and tokenizer files get private copies.
_LINK_MIN_BYTES = 64 * 2**20


class DownloadError(RuntimeError):
    """The checkpoint could not be fetched; the message (one line) says why and what to do about it."""


def default_checkpoint_dir(repo_id: str) -> Path:
    """Where a checkpoint goes when no directory is given: `checkpoints/<org>/<name>`."""
    return Path("checkpoints") / repo_id


def _is_hf_safetensors(name: str) -> bool:
    # Mistral also publishes its own layout as `consolidated*.safetensors` next to the HF shards (e.g. the
    # 8x22B repos): a second full copy of the weights under other tensor names, which the converter does
    # not read. Fetching it would double a download of hundreds of GB.
    return name.endswith(".safetensors") and not name.startswith("consolidated")


def _is_consolidated(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CONSOLIDATED_PATTERNS)


def select_files(repo_files: Iterable[str]) -> list[str]:
    """The files of a repo that the pipeline reads, from the repo's full file list.

    Hugging Face safetensors win when the repo has them; Mistral's original `consolidated.*.pt` files and
    their `params.json` are taken only from repos without safetensors. Files in sub-folders (e.g. Llama's
    `original/`) are never taken: the converter reads the top of the checkpoint directory only.
    """
    top_level = {name for name in repo_files if "/" not in name}
    chosen = [name for name in (CONFIG, TOKENIZER, *OPTIONAL_FILES) if name in top_level]
    hf_weights = sorted(name for name in top_level if _is_hf_safetensors(name))
    if hf_weights:
        chosen += hf_weights + ([SAFETENSORS_INDEX] if SAFETENSORS_INDEX in top_level else [])
    else:
        consolidated = sorted(name for name in top_level if _is_consolidated(name))
        if consolidated:
            chosen += consolidated + ([MISTRAL_PARAMS] if MISTRAL_PARAMS in top_level else [])
    return chosen


def _missing_names(names: Collection[str]) -> list[str]:
    """What a set of top-level file names lacks to be convertible (shard lists inside the index aside)."""
    hf_weights = [name for name in names if _is_hf_safetensors(name)]
    missing = []
    if hf_weights:
        if CONFIG not in names:
            missing.append(CONFIG)
        if len(hf_weights) > 1 and SAFETENSORS_INDEX not in names:
            missing.append(SAFETENSORS_INDEX)
    elif any(_is_consolidated(name) for name in names):
        # Mistral's original layout describes the model in params.json; config.json is optional there.
        if MISTRAL_PARAMS not in names:
            missing.append(MISTRAL_PARAMS)
    else:
        missing.append("weights (*.safetensors, or consolidated.*.pt with params.json)")
        if CONFIG not in names:
            missing.append(CONFIG)
    if TOKENIZER not in names:
        missing.append(TOKENIZER)
    return missing


def missing_files(checkpoint_dir: Path) -> list[str]:
    """What `checkpoint_dir` lacks for the convert step: an empty list when it is complete.

    Complete means a config (`config.json`, or `params.json` beside consolidated weights), `tokenizer.model`
    and the weights, including every shard that `model.safetensors.index.json` names.
    """
    checkpoint_dir = Path(checkpoint_dir)
    names = {p.name for p in checkpoint_dir.iterdir() if p.is_file()} if checkpoint_dir.is_dir() else set()
    missing = _missing_names(names)
    if SAFETENSORS_INDEX in names:
        try:
            weight_map = json.loads((checkpoint_dir / SAFETENSORS_INDEX).read_text())["weight_map"]
            missing += sorted({shard for shard in weight_map.values() if shard not in names})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            missing.append(f"{SAFETENSORS_INDEX} (unreadable: {type(error).__name__}: {error})")
    return missing


def download(
    repo_id: str,
    checkpoint_dir: Path | None = None,
    hf_token: str | None = None,
    *,
    revision: str = "main",
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    max_workers: int = 8,
) -> Path:
    """Fetch what the pipeline needs from Hub repo `repo_id` into `checkpoint_dir` and return that directory.

    `checkpoint_dir` defaults to `checkpoints/<repo_id>`; `cache_dir` to the shared Hugging Face cache
    (`HF_HUB_CACHE`); `endpoint` to `HF_ENDPOINT`; `offline` to `HF_HUB_OFFLINE`, in which case the files come
    from the cache only. Without `hf_token` huggingface_hub falls back to `HF_TOKEN` or the stored login.
    Free disk space is checked before anything is fetched. Raises `DownloadError` with an actionable message.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(repo_id)
    cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    offline = constants.is_offline_mode() if offline is None else offline
    where = endpoint or constants.ENDPOINT
    try:
        if offline:
            snapshot, files = _locate_in_cache(repo_id, revision, cache_dir)
            for description in (CONFIG, MISTRAL_PARAMS):
                if description in files:
                    _check_model_kind(repo_id, snapshot / description)
                    break
            _ensure_disk_space(repo_id, _local_sizes(snapshot, files), set(files), cache_dir, checkpoint_dir)
        else:
            snapshot, files = _fetch(
                repo_id, revision, hf_token, cache_dir, endpoint, max_workers, checkpoint_dir
            )
        _place(snapshot, files, checkpoint_dir)
    except DownloadError:
        raise
    except IncompleteSnapshotError as error:
        raise DownloadError(
            f"the cached snapshot of {repo_id} in {cache_dir} is incomplete ({_first_line(error)}); run once "
            "with network access to finish it"
        ) from error
    except LocalEntryNotFoundError as error:
        if offline:
            raise DownloadError(
                f"{repo_id} (revision {revision}) is not in the Hugging Face cache at {cache_dir} and "
                "HF_HUB_OFFLINE=1 forbids downloading it: run once with network access (HF_HUB_OFFLINE "
                "unset), or point HF_HUB_CACHE / HF_HOME at a cache that holds it"
            ) from error
        raise _network_error(repo_id, where, error) from error
    except (httpx2.TransportError, OfflineModeIsEnabled, RevisionResolutionError) as error:
        raise _network_error(repo_id, where, error) from error
    except (HfHubHTTPError, HFValidationError) as error:
        token_sent = (hf_token or get_token()) is not None  # the hub falls back to HF_TOKEN / stored login
        raise _explain_hub_error(error, repo_id, revision, where, token_given=token_sent) from error
    except OSError as error:
        # Disk full mid-file, permissions, a size mismatch the hub caught: the cache keeps finished files.
        raise DownloadError(
            f"{repo_id}: {_first_line(error)}; fix that and run the same command again "
            "(files already fetched are kept in the Hugging Face cache)"
        ) from error

    missing = missing_files(checkpoint_dir)
    if missing:
        remedy = (
            f"the cached snapshot in {cache_dir} is incomplete: run once with network access to finish it"
            if offline
            else "run the same command again to fetch what is missing"
        )
        raise DownloadError(f"{checkpoint_dir} lacks {', '.join(missing)}: {remedy}")
    logger.info("Checkpoint ready in %s", checkpoint_dir)
    return checkpoint_dir


def _fetch(
    repo_id: str,
    revision: str,
    hf_token: str | None,
    cache_dir: Path,
    endpoint: str | None,
    max_workers: int,
    checkpoint_dir: Path,
) -> tuple[Path, list[str]]:
    """List the repo, check it is usable and fits on disk, then download the chosen files into the cache."""
    api = HfApi(endpoint=endpoint, token=hf_token)
    # Pin one commit for listing, size check and download alike; resolving also records `refs/<revision>`
    # in the cache, which is what a later offline run looks the snapshot up by.
    pinned = api.resolve_revision(repo_id, revision=revision, cache_dir=cache_dir)
    commit = pinned.resolved
    info = api.model_info(repo_id, revision=commit, files_metadata=True, timeout=_API_TIMEOUT_S)
    sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
    files = select_files(sizes)
    unusable = _missing_names(files)
    if unusable:
        raise DownloadError(
            f"{repo_id} (revision {revision}) has no {', '.join(unusable)}: this pipeline needs a Mixtral "
            "checkpoint in Hugging Face form (config.json, tokenizer.model, *.safetensors) or in Mistral's "
            "original form (params.json, tokenizer.model, consolidated.*.pt); check the repo id"
        )

    cached = {
        name
        for name in files
        if isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=commit), str)
    }
    _ensure_disk_space(repo_id, {name: sizes[name] for name in files}, cached, cache_dir, checkpoint_dir)
    # The config first (a few kB, kept in the cache for the snapshot below): a repo of another model is
    # refused before its weights, often tens of GB, are fetched.
    description = CONFIG if CONFIG in files else MISTRAL_PARAMS
    config_path = try_to_load_from_cache(repo_id, description, cache_dir=cache_dir, revision=commit)
    if not isinstance(config_path, str):
        config_path = hf_hub_download(
            repo_id, description, revision=commit, cache_dir=cache_dir, endpoint=endpoint, token=hf_token
        )
    _check_model_kind(repo_id, Path(config_path))
    logger.info(
        "Fetching %d files of %s@%s (%.2f GB, %.2f GB already cached) into %s",
        len(files), repo_id, commit[:10], sum(sizes[n] for n in files) / _GB,
        sum(sizes[n] for n in cached) / _GB, cache_dir,
    )
    # snapshot_download brings the progress bars, the parallelism and the per-file resume logic.
    snapshot = snapshot_download(
        repo_id,
        revision=pinned,
        cache_dir=cache_dir,
        endpoint=endpoint,
        token=hf_token,
        allow_patterns=files,
        max_workers=max_workers,
    )
    return Path(snapshot), files


def _check_model_kind(repo_id: str, description: Path) -> None:
    """Refuse a repo whose config.json (or Mistral's params.json) describes a model the pipeline cannot serve."""
    try:
        content = json.loads(description.read_text())
        if description.name == CONFIG:
            check_hf_model_kind(content)
        else:
            check_mistral_model_kind(content)
    except (ValueError, OSError) as error:  # ConfigError is a ValueError, as are JSON errors
        raise DownloadError(
            f"{repo_id} cannot be used: {_first_line(error)}; check the repo id (this pipeline serves Mixtral-shaped "
            "MoE models in their unquantized release, e.g. mistralai/Mixtral-8x7B-v0.1)"
        ) from error


def _locate_in_cache(repo_id: str, revision: str, cache_dir: Path) -> tuple[Path, list[str]]:
    """Find the cached snapshot of `revision` and choose the files to take from it, without any network."""
    # Only config.json is asked for: the hub checks the requested patterns against the tree listing it cached
    # online, and that listing also names files we deliberately skipped (README, pytorch_model.bin, ...).
    snapshot = Path(
        snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=[CONFIG]
        )
    )
    present = [path.name for path in snapshot.iterdir() if path.is_file()]
    return snapshot, select_files(present)


def _local_sizes(snapshot: Path, files: Iterable[str]) -> dict[str, int]:
    return {name: (snapshot / name).stat().st_size for name in files if (snapshot / name).is_file()}


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _ensure_disk_space(
    repo_id: str, sizes: dict[str, int], cached: set[str], cache_dir: Path, checkpoint_dir: Path
) -> None:
    """Refuse, before any byte is written, a download that would not fit on the disks it writes to."""
    cache_disk = _existing_ancestor(cache_dir)
    checkpoint_disk = _existing_ancestor(checkpoint_dir)
    demands = {cache_disk: sum(size for name, size in sizes.items() if name not in cached)}
    if cache_disk.stat().st_dev != checkpoint_disk.stat().st_dev:
        # No hard links across filesystems: the checkpoint directory gets a full copy of every file.
        demands[checkpoint_disk] = demands.get(checkpoint_disk, 0) + sum(sizes.values())
    for disk, needed in demands.items():
        if needed == 0:
            continue
        headroom = max(_MIN_HEADROOM_BYTES, int(needed * _HEADROOM_FRACTION))
        free = shutil.disk_usage(disk).free
        if free < needed + headroom:
            raise DownloadError(
                f"not enough disk space for {repo_id}: {needed / _GB:.2f} GB must be written under {disk} "
                f"(plus {headroom / _GB:.2f} GB headroom) but only {free / _GB:.2f} GB is free; free some "
                "space, or choose another --checkpoint-dir or HF_HUB_CACHE"
            )


def _place(snapshot: Path, files: Iterable[str], checkpoint_dir: Path) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for name in files:
        # Resolve the cache's snapshot symlink: the checkpoint must hold the blob itself, not a link into a
        # cache that `hf cache delete` may empty.
        _link_or_copy((snapshot / name).resolve(), checkpoint_dir / name)


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists() and os.path.samefile(source, target):
        return
    # Build under a temporary name and rename, so an interrupted copy never leaves a truncated file that
    # looks complete to the converter.
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        if source.stat().st_size < _LINK_MIN_BYTES or not _hard_link(source, partial, target.name):
            shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _hard_link(source: Path, target: Path, name: str) -> bool:
    try:
        os.link(source, target)
        return True
    except OSError as error:  # another filesystem, or a cache owned by someone else (protected_hardlinks)
        logger.info("Copying %s instead of hard-linking it (%s)", name, error.strerror or error)
        return False


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _network_error(repo_id: str, endpoint: str, error: BaseException) -> DownloadError:
    # The hub wraps the transport error it met; that one says what actually went wrong.
    wrapped = isinstance(error, (RevisionResolutionError, LocalEntryNotFoundError))
    cause = error.__cause__ if wrapped else error
    reason = f"{type(cause).__name__}: {_first_line(cause)}" if cause is not None else _first_line(error)
    return DownloadError(
        f"cannot reach {endpoint} to download {repo_id} ({reason}); check the network connection, proxy and "
        "HF_ENDPOINT. To use files already in the local Hugging Face cache, run with HF_HUB_OFFLINE=1"
    )


def _explain_hub_error(
    error: Exception, repo_id: str, revision: str, endpoint: str, *, token_given: bool
) -> DownloadError:
    """Turn what the Hub answered into a one-line message that says what to do next."""
    page = f"{endpoint}/{repo_id}"
    token_hint = "pass --hf-token or set HF_TOKEN"
    if isinstance(error, HFValidationError):
        return DownloadError(f"{repo_id!r} is not a valid repo id: use the form 'org/name', as on its page")
    status = error.response.status_code if isinstance(error, HfHubHTTPError) else None
    if isinstance(error, GatedRepoError):
        now = "the token given has not been granted access yet" if token_given else "no token was sent"
        return DownloadError(
            f"{repo_id} is a gated model and {now} (HTTP {status}): accept its licence on {page} while "
            f"logged in, then {token_hint} to a read token of that account "
            "(https://huggingface.co/settings/tokens)"
        )
    if isinstance(error, RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no revision {revision!r}: check --revision (branch, tag, sha)")
    if isinstance(error, RepositoryNotFoundError):
        if status == 401 and not token_given:
            # The Hub answers 401 alike for a missing repo and for a private one asked without a token.
            return DownloadError(
                f"repository {repo_id} was not found at {endpoint}, or it is private or gated and no token "
                "was sent (HTTP 401): check the repo id (org/name, as on the model page); for a private or "
                f"gated repo {token_hint}"
            )
        return DownloadError(
            f"repository {repo_id} was not found at {endpoint} (HTTP {status}): check the repo id "
            "(org/name, as on the model page); if it is private, the token must belong to an account that "
            "can see it"
        )
    if status == 401:
        return DownloadError(
            f"the Hub rejected the token (HTTP 401) for {repo_id}: check --hf-token / HF_TOKEN, or create "
            "a new read token at https://huggingface.co/settings/tokens"
        )
    if status == 403:
        return DownloadError(
            f"access to {repo_id} was refused (HTTP 403): accept the licence on {page} and make sure the "
            "token has read access (fine-grained tokens need access to public gated repos), then "
            f"{token_hint}"
        )
    return DownloadError(
        f"the Hub answered HTTP {status} for {repo_id} ({_first_line(error)}); try again later"
    )
