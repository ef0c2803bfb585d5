"""Models by Hub id, from a Hub-layout cache built here and a small Hub-protocol server on 127.0.0.1 (no internet): a
span downloads and opens only the shards of its blocks, a revision picks its own snapshot, the token reaches the Hub
(and no log), and offline a missing file is named."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

import nectar.models.checkpoint as checkpoint_module
import nectar.models.hub as hub_module
from nectar.models import (
    CheckpointError,
    MissingCheckpointFileError,
    ModelNotFoundError,
    load_client_head,
    load_config,
    load_span,
    load_tokenizer,
    model_id_of,
    resolve_model,
)
from nectar.models.hub import parse_hub_id, seed_cache, with_revision
from nectar.models.tiny import save_tiny_sharded_checkpoint

REPO = "tiny-org/tiny-llama"


def shards_of(folder: Path, prefixes: tuple[str, ...]) -> set[str]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {shard for key, shard in weight_map.items() if key.startswith(prefixes)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Two revisions of REPO in a Hub cache (main, and v2 with other weights), used offline."""
    root = tmp_path_factory.mktemp("hub")
    folders = {
        "main": save_tiny_sharded_checkpoint(root / "main", seed=0),
        "v2": save_tiny_sharded_checkpoint(root / "v2", seed=1),
    }
    cache = root / "cache"
    snapshots = {
        revision: seed_cache(folder, REPO, revision=revision, cache=cache) for revision, folder in folders.items()
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield {"cache": cache, "folders": folders, "snapshots": snapshots}


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The file names ``Checkpoint`` opens (an observation hook on safetensors' ``safe_open``)."""
    names: list[str] = []
    real = checkpoint_module.safe_open

    def recording(path, *args, **kwargs):
        names.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", recording)
    return names


def test_hub_ids_are_validated_and_local_folders_win(tmp_path, monkeypatch):
    assert parse_hub_id("org/name@v1.0").revision == "v1.0"
    assert parse_hub_id("org/name").revision is None
    for bad in ("name", "org/na me", "org/../x", "a--b/c", "org/name@", "/abs/path", "org/name@../x"):
        assert parse_hub_id(bad) is None, bad
    assert with_revision("org/name", "v2") == "org/name@v2"
    assert with_revision("org/name@v2", "v2") == "org/name@v2"
    with pytest.raises(ValueError, match="already names revision"):
        with_revision("org/name@v1", "v2")
    with pytest.raises(ValueError, match="applies to Hub ids"):
        with_revision("smollm2-135m", "v2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "org" / "name" / "config.json").write_text("{}")
    assert resolve_model("org/name") == (tmp_path / "org" / "name").resolve()  # the folder, not the Hub


def test_span_opens_only_the_shards_of_its_blocks_and_matches_transformers(hub, opened, reference_hidden_states):
    main = hub["folders"]["main"]
    own = shards_of(main, ("model.layers.0.", "model.layers.1."))
    others = shards_of(main, ("model.layers.2.", "model.layers.3.", "model.embed_tokens.", "lm_head.", "model.norm."))
    assert others - own, "the fixture must put other blocks' tensors in other shards"
    span = load_span(REPO, 0, 2)
    assert set(opened) == own
    reference = AutoModelForCausalLM.from_pretrained(str(main)).eval()
    states = reference_hidden_states(reference, torch.tensor([[5, 6, 7, 8]]))
    with torch.no_grad():
        torch.testing.assert_close(span(states[0]), states[2], rtol=1e-5, atol=1e-5)


def test_client_head_and_tokenizer_come_from_the_snapshot(hub, opened):
    main = hub["folders"]["main"]
    head = load_client_head(REPO)
    assert set(opened) == shards_of(main, ("model.embed_tokens.", "lm_head.", "model.norm."))
    tokenizer = load_tokenizer(resolve_model(REPO))
    assert tokenizer("w5 w6")["input_ids"][-2:] == [5, 6]
    assert head.embed(torch.tensor([[5]])).shape == (1, 1, 64)


def test_revision_picks_its_own_snapshot_and_model_id(hub, reference_hidden_states):
    snapshots = hub["snapshots"]
    assert resolve_model(REPO) == snapshots["main"]
    assert resolve_model(f"{REPO}@v2") == snapshots["v2"] != snapshots["main"]
    # peers announce the commit: a node on main and a client on v2 never share a route
    assert model_id_of(REPO) == f"{REPO}@{snapshots['main'].name}"
    assert model_id_of(f"{REPO}@v2") == f"{REPO}@{snapshots['v2'].name}"
    assert model_id_of(snapshots["v2"]) == model_id_of(f"{REPO}@{snapshots['v2'].name}")  # the commit itself works
    reference = AutoModelForCausalLM.from_pretrained(str(hub["folders"]["v2"])).eval()
    states = reference_hidden_states(reference, torch.tensor([[9, 10, 11]]))  # the last one is after the norm
    with torch.no_grad():
        torch.testing.assert_close(load_span(f"{REPO}@v2", 1, 3)(states[1]), states[3], rtol=1e-5, atol=1e-5)
    with pytest.raises(MissingCheckpointFileError, match="HF_HUB_OFFLINE"):
        resolve_model(f"{REPO}@no-such-tag")


def test_offline_missing_shard_is_named_and_other_spans_still_load(hub, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(hub["cache"], cache, symlinks=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snapshot = cache / hub["snapshots"]["main"].relative_to(hub["cache"])
    main = hub["folders"]["main"]
    needed = shards_of(main, ("model.layers.0.", "model.layers.1."))
    for shard in shards_of(main, ("model.",)) | shards_of(main, ("lm_head.",)):
        if shard not in needed:
            (snapshot / shard).unlink()  # never downloaded: only blocks 0-1 were
    assert load_config(REPO).num_hidden_layers == 4
    load_span(REPO, 0, 2)
    missing = sorted(shards_of(main, ("model.layers.3.",)) - needed)[0]
    with pytest.raises(MissingCheckpointFileError, match=f"{missing}.*HF_HUB_OFFLINE is set.*hf download {REPO}"):
        load_span(REPO, 2, 4)


def test_offline_unknown_model_says_what_to_do(hub):
    with pytest.raises(MissingCheckpointFileError, match=r"config.json of nobody/nothing@main is not in the Hugging"):
        resolve_model("nobody/nothing")
    with pytest.raises(ModelNotFoundError, match="Hub id"):
        resolve_model("not-a-hub-id-nor-folder")


def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path):
    """A downloaded index is the repo author's text: it must not make a node read (or fetch) files elsewhere."""
    folder = save_tiny_sharded_checkpoint(tmp_path / "evil", seed=0)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = data["weight_map"]["model.norm.weight"]
    shutil.copyfile(folder / shard, tmp_path / "elsewhere.safetensors")  # a readable file outside the folder
    data["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="elsewhere.safetensors"):
        load_client_head(folder)


TOKEN = "hf_test_secret_token"


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's file endpoint (``/{repo}/resolve/{revision}/{file}``, HEAD and GET) over ``snapshots`` (revision ->
    folder); a gated repo: every request must carry TOKEN. ``requests`` records (method, revision, file)."""

    snapshots: dict[str, Path] = {}
    requests: list[tuple[str, str, str]] = []
    authorizations: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _fail(self, status: int, code: str, commit: str | None = None):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body: bool):
        parts = self.path.lstrip("/").split("/", 4)  # org, name, "resolve", revision, file
        if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != REPO or parts[2] != "resolve":
            return self._fail(401, "RepoNotFound")
        revision, filename = unquote(parts[3]), unquote(parts[4])
        self.requests.append((self.command, revision, filename))
        self.authorizations.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._fail(403, "GatedRepo")
        folder = self.snapshots.get(revision) or next((f for f in self.snapshots.values() if f.name == revision), None)
        if folder is None:
            return self._fail(404, "RevisionNotFound")
        path = folder / filename
        if not path.is_file():
            return self._fail(404, "EntryNotFound", folder.name)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", folder.name)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """An empty cache and the fake Hub serving ``hub``'s two revisions; HF_HUB_OFFLINE off."""
    FakeHub.snapshots, FakeHub.requests, FakeHub.authorizations = dict(hub["snapshots"]), [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_module, "_tokens", {})
    yield tmp_path / "cache"
    server.shutdown()
    server.server_close()


def test_online_a_span_downloads_only_its_shards_with_the_token(hub, online, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ModelNotFoundError, match="gated.*--token"):
        resolve_model(REPO)  # no token: the Hub refuses, and the error says what to do
    snapshot = resolve_model(REPO, token=TOKEN)
    assert snapshot.parent.parent.parent == online and snapshot.name == hub["snapshots"]["main"].name
    load_span(REPO, 0, 2)
    main = hub["folders"]["main"]
    downloaded = {name for method, _, name in FakeHub.requests if method == "GET" and name.endswith(".safetensors")}
    assert downloaded == shards_of(main, ("model.layers.0.", "model.layers.1."))
    assert {p.name for p in snapshot.glob("*.safetensors")} == downloaded  # the cache holds no other shard
    # the branch is resolved once; every later file is asked for at that commit, so a moving branch cannot mix weights
    revisions = {revision for _, revision, name in FakeHub.requests if name != "config.json"}
    assert revisions == {snapshot.name}
    assert set(FakeHub.authorizations[1:]) == {f"Bearer {TOKEN}"}
    assert TOKEN not in caplog.text
    with pytest.raises(ModelNotFoundError, match="no revision 'v3'"):
        resolve_model(f"{REPO}@v3")
