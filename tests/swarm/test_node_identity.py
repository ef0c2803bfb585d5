"""Every node gets its own identity: nodes started without --name/--key-dir take free key folders, and a key folder
a live node holds is refused with a clear error (two nodes used to announce one peer id and one address)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nectar.node.identity import KeyDirInUse, claim_free_key_dir, claim_key_dir
from nectar.node.local_swarm import LocalSwarm


def test_free_folders_are_taken_in_order_and_given_back(tmp_path):
    first, second = claim_free_key_dir(tmp_path), claim_free_key_dir(tmp_path)
    assert (first.name, second.name) == ("node", "node-2") and first.path != second.path
    first.release()
    again = claim_free_key_dir(tmp_path)  # a restarted node gets the first identity back
    assert again.path == first.path
    with pytest.raises(KeyDirInUse, match="is in use by the node with process id") as error:
        claim_key_dir(second.path, name="x")
    assert "--key-dir" in str(error.value)
    again.release()
    second.release()


def test_a_folder_held_by_another_process_is_refused(tmp_path):
    held = claim_key_dir(tmp_path / "keys", name="a")
    code = (
        "import sys; from nectar.node.identity import claim_key_dir, KeyDirInUse\n"
        "try: claim_key_dir(sys.argv[1], name='b')\n"
        "except KeyDirInUse as e: print(e); sys.exit(3)"
    )
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "keys")], capture_output=True, text=True)
    assert other.returncode == 3 and "in use" in other.stdout
    held.release()
    free = subprocess.run([sys.executable, "-c", code, str(tmp_path / "keys")], capture_output=True, text=True)
    assert free.returncode == 0, free.stdout + free.stderr


@pytest.mark.slow
def test_nodes_without_names_get_their_own_identity_and_a_shared_key_dir_is_refused(tiny_llama, tmp_path):
    with LocalSwarm(workdir=tmp_path / "swarm") as swarm:
        a = swarm.add_node(tiny_llama, blocks=(0, 2), name="a", own_keys=False, extra_args=["--throughput", "100"])
        b = swarm.add_node(tiny_llama, blocks=(2, 4), name="b", own_keys=False, extra_args=["--throughput", "100"])
        peer_of = lambda node: node.address.rsplit("/", 1)[-1]  # noqa: E731
        assert peer_of(a) != peer_of(b) and a.eth_address and b.eth_address and a.eth_address != b.eth_address
        assert {p.name for p in (tmp_path / "swarm" / "home" / "nodes").iterdir()} == {"node", "node-2"}
        shared = ["--key-dir", str(tmp_path / "shared"), "--throughput", "100"]
        swarm.add_node(tiny_llama, blocks=(0, 2), name="c", own_keys=False, extra_args=shared)
        with pytest.raises(RuntimeError, match="key folder .* is in use by the node with process id"):
            swarm.add_node(tiny_llama, blocks=(0, 2), name="d", own_keys=False, extra_args=shared)
