"""A node's announced name is the announcer's text, printed in clients' logs and errors, the `nectar health` table and
the API's market page: a sybil's record must not forge log lines (newlines, terminal escapes) or fill them (a
megabyte of name), and a malformed record's error must not print the record whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hivemind.p2p import PeerID

from nectar.client.routing.spans import RemoteSpan
from nectar.wire.announce import MAX_PUBLIC_NAME, ServerInfo
from tests.wire.test_adapter_fields import _info

FORGED = [
    "a\n2026-12-06 10:00:00,000 INFO nectar.node: Slashed node 0x1",  # a forged log line
    "\x1b[2J\x1b[Hnode",  # terminal escapes: clear the operator's screen
    "node\r",
    "\u202enode",  # right-to-left override
    "x" * (MAX_PUBLIC_NAME + 1),
    7,
    None,
    ["node"],
]


@pytest.mark.parametrize("name", FORGED, ids=range(len(FORGED)))
def test_a_record_with_a_forged_or_oversized_name_is_refused(name):
    with pytest.raises(ValueError, match="public_name"):
        ServerInfo.from_dict(_info(public_name=name))


def test_plain_names_pass_and_print_as_announced():
    for name in ("", "gamma", "Alice's node #2", "ノード-7", "x" * MAX_PUBLIC_NAME):
        info = ServerInfo.from_dict(_info(public_name=name))
        assert info.public_name == name
    info = ServerInfo.from_dict(_info(public_name="gamma"))
    assert f"{RemoteSpan(PeerID(b'x' * 34), 0, 4, info)}" == "gamma[0:4]"  # how logs and errors name the hop


@pytest.mark.parametrize("field", ["eth_address", "direct_address", "eth_proof", "dtype"])
def test_other_announced_text_is_bounded_and_printable(field):
    for bad in ("x" * 257, "1.2.3.4:5\nforged line", "\x1b[31m"):
        with pytest.raises(ValueError, match="oversized or unprintable"):
            ServerInfo.from_dict(_info(**{field: bad}))


def test_a_malformed_records_error_is_short():
    for bad in (_info(throughput="x" * 2**20), _info(dtype=["x" * 2**20]), _info(public_name="x" * 2**20)):
        with pytest.raises(ValueError) as error:
            ServerInfo.from_dict(bad)
        assert len(str(error.value)) < 1200


def test_a_node_refuses_to_start_with_a_name_peers_would_ignore(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "node", "--model", str(tmp_path / "none"), "--name", "a\nb"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NECTAR_HOME": str(tmp_path)},
    )
    assert done.returncode == 2 and "--name must be at most 64 printable characters" in done.stderr, done.stderr
