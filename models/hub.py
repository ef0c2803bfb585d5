"""Models by Hugging Face Hub id: ``org/name`` or ``org/name@revision`` (branch, tag or commit).

``hub_snapshot`` resolves the revision to a commit and fetches config, tokenizer files and the safetensors index into
huggingface_hub's standard cache (HF_HOME / HF_HUB_CACHE); ``Checkpoint`` then fetches only the shard files holding
the tensors it reads (``hub_fetcher``), so a node downloads its blocks and a client its embeddings and head.
``HF_HUB_OFFLINE=1`` serves from the cache. Peers announce ``org/name@<commit>``: a node and a client that resolved
different commits never share a route.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nectar.models.errors import MissingCheckpointFileError, ModelError, ModelNotFoundError

logger = logging.getLogger(__name__)

_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
HUB_ID = re.compile(rf"(?P<repo>{_REPO}/{_REPO})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{{0,127}}))?")
COMMIT = re.compile(r"[0-9a-f]{40}")
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# tokenizer and generation files a checkpoint may have; each is fetched if the repo has it
OPTIONAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)

_tokens: dict[str, str] = {}  # repo id -> token given in this process (--token); never logged
_snapshots: dict[tuple[str, str, str], Path] = {}  # (repo, revision, cache) -> snapshot: one resolution per process


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None  # None = main

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub_id(text: str) -> HubRef | None:
    """``org/name[@revision]`` as a HubRef, or None if ``text`` is not shaped like a Hub id."""
    match = HUB_ID.fullmatch(text)
    if match is None:
        return None
    repo, revision = match["repo"], match["revision"]
    if "--" in repo or ".." in repo or repo.endswith(".git") or (revision and ".." in revision):
        return None  # the Hub refuses these names; "--" would also break the cache's folder naming
    return HubRef(repo, revision)


def with_revision(model: str, revision: str | None) -> str:
    """``model`` pinned to ``revision`` (the CLIs' --revision): ``org/name`` -> ``org/name@revision``."""
    if not revision:
        return model
    ref = parse_hub_id(model)
    if ref is None or Path(model).expanduser().is_dir():
        raise ValueError(f"--revision applies to Hub ids (org/name); {model!r} is a built-in name or a local folder")
    if ref.revision and ref.revision != revision:
        raise ValueError(f"{model!r} already names revision {ref.revision!r}; drop --revision {revision} or the @")
    if parse_hub_id(f"{ref.repo_id}@{revision}") is None:
        raise ValueError(f"--revision {revision!r} is not a branch, tag or commit name")
    return f"{ref.repo_id}@{revision}"


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / ("models--" + repo_id.replace("/", "--"))


def _download(repo_id: str, filename: str, revision: str, *, cache: Path, required: bool = True) -> Path | None:
    """One file through ``hf_hub_download`` (its progress bar included); None if absent and not ``required``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, token=_tokens.get(repo_id)))
    except LocalEntryNotFoundError as error:  # offline, or the Hub unreachable, and not cached
        if not required:
            return None
        why = "HF_HUB_OFFLINE is set" if is_offline() else f"the Hub could not be reached ({error.__cause__ or error})"
        raise MissingCheckpointFileError(
            f"{filename} of {where} is not in the Hugging Face cache ({cache}) and {why}. Download it once online "
            f"(`hf download {repo_id} {filename} --revision {revision}`, or start this command online), or point "
            f"HF_HUB_CACHE at a cache that has it.",
            filename=filename,
        ) from error
    except GatedRepoError as error:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then pass --token (or set "
            f"HF_TOKEN, or run `hf auth login`) with a token of that account"
        ) from error
    except RepositoryNotFoundError as error:
        raise ModelNotFoundError(
            f"no model {repo_id!r} on the Hugging Face Hub that this token may read (private? pass --token or set "
            f"HF_TOKEN), and it is neither a built-in name nor a local folder. `nectar models` lists built-in ones."
        ) from error
    except RevisionNotFoundError as error:
        raise ModelNotFoundError(
            f"{repo_id} has no revision {revision!r}: pass a branch, tag or commit it has"
        ) from error
    except EntryNotFoundError as error:
        if not required:
            return None
        raise MissingCheckpointFileError(
            f"{where} has no {filename}: Nectar needs a safetensors checkpoint (config.json + {SINGLE_FILE} or "
            f"{INDEX_FILE} with its shards)",
            filename=filename,
        ) from error
    except HfHubHTTPError as error:
        raise ModelError(
            f"downloading {filename} of {where} failed: {error}. Retry, or set HF_HUB_OFFLINE=1 to use the cache only"
        ) from error


def hub_snapshot(ref: HubRef, *, token: str | None = None) -> Path:
    """The cache's snapshot folder of ``ref``'s commit, holding config, tokenizer files and the safetensors index
    (or the single ``model.safetensors``); shards come later, as ``Checkpoint`` reads them."""
    if token:
        _tokens[ref.repo_id] = token
    cache = cache_root()
    key = (ref.repo_id, ref.revision or "main", str(cache))
    if key in _snapshots:
        return _snapshots[key]
    config = _download(ref.repo_id, CONFIG_FILE, ref.revision or "main", cache=cache)
    folder = config.parent
    commit = folder.name  # the snapshot folder is named by the commit the revision resolved to
    for name in OPTIONAL_FILES:
        _download(ref.repo_id, name, commit, cache=cache, required=False)
    if _download(ref.repo_id, INDEX_FILE, commit, cache=cache, required=False) is None:
        _download(ref.repo_id, SINGLE_FILE, commit, cache=cache)
    logger.info("Resolved %s to commit %s in %s", ref, commit, folder)
    _snapshots[key] = folder
    return folder


def snapshot_ref(path: str | os.PathLike) -> tuple[HubRef, Path] | None:
    """``(org/name@commit, cache)`` if ``path`` is a snapshot folder of a Hub cache, else None."""
    path = Path(path)
    repo_dir = path.parent.parent
    if path.parent.name != "snapshots" or not repo_dir.name.startswith("models--") or not COMMIT.fullmatch(path.name):
        return None
    ref = parse_hub_id(repo_dir.name.removeprefix("models--").replace("--", "/", 1) + "@" + path.name)
    return (ref, repo_dir.parent) if ref else None


def hub_model_id(path: str | os.PathLike) -> str | None:
    """What a snapshot folder is announced as: ``org/name@<commit>``; None for other folders."""
    found = snapshot_ref(path)
    return str(found[0]) if found else None


def hub_fetcher(path: str | os.PathLike) -> Callable[[str], Path] | None:
    """For a snapshot folder, a function fetching one more of its files (e.g. a shard) on first use; else None."""
    found = snapshot_ref(path)
    if found is None:
        return None
    ref, cache = found

    def fetch(filename: str) -> Path:
        return _download(ref.repo_id, filename, ref.revision, cache=cache)

    return fetch


def seed_cache(folder: str | os.PathLike, repo_id: str, *, revision: str = "main", cache: Path | None = None) -> Path:
    """Copy a local checkpoint folder into a Hub-layout cache as ``repo_id`` at ``revision`` (a branch or tag name),
    as huggingface_hub would have downloaded it; returns the snapshot folder. For machines without the Hub (and tests).
    The commit is derived from the files, so the same folder always gets the same commit."""
    if parse_hub_id(f"{repo_id}@{revision}") is None:
        raise ValueError(f"{repo_id!r} at {revision!r} is not a valid Hub id and revision")
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1("".join(f"{n}:{d}\n" for n, d in digests.items()).encode()).hexdigest()
    root = repo_folder(repo_id, cache)
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = root / "blobs" / digests[path.name]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", "blobs", digests[path.name]))
    (root / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot
