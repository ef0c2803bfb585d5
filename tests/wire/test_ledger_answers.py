"""Whoever runs the ledger a node, client or gateway points at chooses what it answers: an answer past 16 MiB is
refused before more of it is read, and an error's text is cut before it reaches logs and users. A real HTTP server."""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nectar.wire.ledger_api import MAX_ANSWER_BYTES, LedgerClient, LedgerError

SENT: dict[str, int] = {}


class HostileLedger(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.endswith("/config"):  # an honest answer
            body = json.dumps({"epoch_seconds": 60}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.endswith("/epochs"):  # no length declared, then 256 MiB
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            SENT["endless"] = 0
            try:
                for _ in range(256):
                    self.wfile.write(b" " * (1 << 20))
                    SENT["endless"] += 1 << 20
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path.endswith("/verifiers"):  # a gzip bomb: 16 KiB that would grow to 16 MiB and more
            body = gzip.compress(b" " * (64 << 20))
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.endswith("/stats"):  # a byte every 0.2 s, for ever
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.2)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif self.path.endswith("/reputation"):  # declares a terabyte
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
        else:  # an error with a megabyte of text
            body = json.dumps({"detail": "not found: " + "x" * (1 << 20)}).encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def ledger():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HostileLedger)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = LedgerClient(f"http://127.0.0.1:{server.server_address[1]}", timeout=30)
    yield client
    client.close()
    server.shutdown()


def test_an_honest_answer_is_read(ledger):
    assert ledger.config() == {"epoch_seconds": 60}


def test_an_answer_past_the_limit_is_refused_before_it_is_read_whole(ledger):
    began = time.monotonic()
    with pytest.raises(LedgerError, match="passed") as error:
        ledger.epochs()
    assert error.value.status == 502 and time.monotonic() - began < 20
    time.sleep(0.5)
    assert SENT["endless"] < 64 << 20  # the client hung up: the ledger could not push its 256 MiB
    with pytest.raises(LedgerError, match="declares") as error:
        ledger.reputation()
    assert str(1 << 40) in str(error.value) and str(MAX_ANSWER_BYTES) in str(error.value)


def test_an_errors_text_is_cut(ledger):
    with pytest.raises(LedgerError) as error:
        ledger.node("0x" + "12" * 20)
    assert error.value.status == 404 and error.value.detail.startswith("not found: xxx")
    assert len(error.value.detail) < 1100 and len(str(error.value)) < 1200


def test_a_compressed_or_trickling_answer_is_refused(ledger):
    with pytest.raises(LedgerError, match="gzip-encoded") as error:
        ledger._request("GET", "/v1/verifiers")
    assert error.value.status == 502
    slow = LedgerClient(ledger.base_url, timeout=2)  # each byte comes well within a read's timeout
    began = time.monotonic()
    with pytest.raises(LedgerError, match="took more than 2s") as error:
        slow._request("GET", "/v1/stats")
    assert error.value.status == 504 and time.monotonic() - began < 10
    slow.close()
