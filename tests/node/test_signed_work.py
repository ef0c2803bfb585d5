"""The signed-work guard (node/signed_work.py): one receipt per work key, kept in a journal across restarts, bounded
by the chain's evidence window and a key limit. Real files in a temporary folder; the clock is a test's."""

from __future__ import annotations

import os

import pytest

from nectar.node.signed_work import RECORD, JournalFull, SignedWork, State
from nectar.wire import receipts as schema

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000 * HOUR):
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(step: int, session: bytes = b"\x01" * 32) -> bytes:
    return schema.work_key(session, 0, 4, int(schema.ReceiptKind.INFERENCE), step)


def test_work_keys_differ_in_every_field_and_bound_sessions_in_client_id_and_nonce():
    session = b"\x01" * 32
    keys = {
        schema.work_key(session, 0, 4, 0, 1),
        schema.work_key(session, 0, 4, 0, 2),
        schema.work_key(session, 0, 4, 1, 1),
        schema.work_key(session, 0, 5, 0, 1),
        schema.work_key(session, 1, 4, 0, 1),
        schema.work_key(b"\x02" * 32, 0, 4, 0, 1),
    }
    assert len(keys) == 6 and all(len(k) == 16 for k in keys)
    nonce = os.urandom(32)
    bound = schema.bind_session(b"abc", nonce)
    assert len(bound) == 32 and bound == schema.bind_session(b"abc".rjust(32, b"\0"), nonce)
    assert bound != schema.bind_session(b"abd", nonce) and bound != schema.bind_session(b"abc", os.urandom(32))
    with pytest.raises(ValueError, match="32 bytes"):
        schema.bind_session(b"abc", b"short")


def test_a_key_is_taken_once_and_signed_once():
    work = SignedWork(None, clock=Clock())
    assert work.take(key(1)) is State.FREE
    assert work.take(key(1)) == State.TAKEN  # a second step for it is refused while the first computes
    work.signed(key(1), b"\xaa" * 32, ({"receipt": 1}, b"fp"))
    assert work.take(key(1)) == State.SIGNED
    assert work.replay(key(1)) == (b"\xaa" * 32, ({"receipt": 1}, b"fp"))
    assert work.take(key(2)) is State.FREE
    work.release(key(2))  # its step failed before signing: free again
    assert work.take(key(2)) is State.FREE
    work.release(key(1))  # a signed key is never released
    assert work.take(key(1)) == State.SIGNED


def test_a_restarted_node_still_refuses_what_it_signed(tmp_path):
    clock = Clock()
    work = SignedWork(tmp_path, clock=clock)
    for step in range(5):
        assert work.take(key(step)) is State.FREE
        work.signed(key(step), bytes([step]) * 32, ({"step": step}, b""))
    work.take(key(9))  # taken, never signed: nothing to remember across a restart
    work.close()
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) == 5 * RECORD.size

    clock.now += 600
    again = SignedWork(tmp_path, clock=clock)
    assert len(again) == 5
    for step in range(5):
        assert again.take(key(step)) == State.SIGNED  # signed before the restart
        assert again.replay(key(step)) is None  # receipts themselves are not journaled: a re-send gets an error
    assert again.take(key(9)) is State.FREE


def test_a_record_cut_short_by_a_crash_is_ignored(tmp_path):
    clock = Clock()
    work = SignedWork(tmp_path, clock=clock)
    work.take(key(1))
    work.signed(key(1), b"\x11" * 32)
    work.close()
    (journal,) = tmp_path.iterdir()
    with open(journal, "ab") as f:
        f.write(key(2)[:5])  # the node died mid-write: that receipt never left it
    again = SignedWork(tmp_path, clock=clock)
    assert again.take(key(1)) == State.SIGNED and again.take(key(2)) is State.FREE


def test_keys_older_than_the_evidence_window_are_forgotten_and_their_files_deleted(tmp_path):
    clock = Clock()
    work = SignedWork(tmp_path, window_s=3 * HOUR, bucket_s=HOUR, clock=clock)
    for hour in range(6):
        for step in range(100):
            k = key(step, session=bytes([hour]) * 32)
            assert work.take(k) is State.FREE
            work.signed(k, b"\x01" * 32)
        clock.now += HOUR
        assert len(work) <= 4 * 100  # the window (3 hours) and the current hour, never more
        assert len(list(tmp_path.iterdir())) <= 4
    # hour 5 is the last one signed; hours 0 and 1 are past the window (now is hour 6)
    assert work.take(key(0, session=b"\x00" * 32)) is State.FREE
    assert work.take(key(0, session=bytes([5]) * 32)) == State.SIGNED
    work.close()

    clock.now += 10 * HOUR  # a node restarted after a long stop forgets (and deletes) everything
    again = SignedWork(tmp_path, window_s=3 * HOUR, bucket_s=HOUR, clock=clock)
    assert len(again) == 0 and not list(tmp_path.iterdir())


def test_a_key_signed_near_a_bucket_edge_lives_a_full_window():
    clock = Clock()
    work = SignedWork(None, window_s=2 * HOUR, bucket_s=HOUR, clock=clock)
    work.take(key(1))
    clock.now += HOUR  # taken in one bucket, signed in the next
    work.signed(key(1), b"\x07" * 32)
    clock.now += 2 * HOUR
    work.take(key(2))  # rolls the buckets: the take's bucket is gone, the signature's is not
    assert work.take(key(1)) == State.SIGNED


def test_the_number_of_keys_is_bounded():
    clock = Clock()
    work = SignedWork(None, max_keys=10, window_s=HOUR, bucket_s=HOUR, clock=clock)
    for step in range(10):
        work.take(key(step))
        work.signed(key(step), b"\x01" * 32)
    with pytest.raises(JournalFull, match="takes new work once the oldest age out"):
        work.take(key(10))
    clock.now += 3 * HOUR
    assert work.take(key(10)) is State.FREE and len(work) == 1


def test_the_window_follows_the_deployments_evidence_age(tmp_path):
    from nectar.deployment import DEFAULT_MAX_EVIDENCE_AGE, max_evidence_age_from_deployment

    deployment = tmp_path / "deployment.json"
    assert max_evidence_age_from_deployment(deployment) == DEFAULT_MAX_EVIDENCE_AGE == 12 * 3600  # no file
    deployment.write_text('{"params": {"max_evidence_age": 86400}}')
    assert max_evidence_age_from_deployment(deployment) == 86400
    deployment.write_text("not json")
    assert max_evidence_age_from_deployment(deployment) == DEFAULT_MAX_EVIDENCE_AGE
