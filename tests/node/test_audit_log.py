"""The node's audit log (issue 21): records on disk outlive the process, age out only after their retention, and a
full budget refuses new work instead of dropping a record an audit may still ask for."""

from __future__ import annotations

import os

import pytest
import torch

from nectar.node.audit import AuditLog
from nectar.wire.protocol import ErrorCode, NodeRPCError

HIDDEN = 576  # SmolLM2's


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _row(value: float, tokens: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.full((1, tokens, HIDDEN), value, dtype=dtype)


def _disk_log(folder, clock, **kw) -> AuditLog:
    kw = {"max_bytes": 1 << 24, "retention_s": 60.0, "max_disk_bytes": 1 << 26, "bucket_s": 10.0, **kw}
    return AuditLog(folder=folder, clock=clock, **kw)


def _refused(fn) -> str:
    with pytest.raises(NodeRPCError) as error:
        fn()
    assert error.value.code == ErrorCode.CACHE_FULL
    return str(error.value)


def test_records_on_disk_are_read_back_by_a_new_process_exactly(tmp_path):
    clock = Clock()
    log = _disk_log(tmp_path, clock)
    prompts = torch.randn(2, 1, 3, HIDDEN)
    log.record(b"s", 0, 0, _row(1, 3), 0, 2, prompts=prompts, outputs=_row(10, 3))
    log.record(b"s", 1, 3, _row(2), 0, 2, outputs=_row(20, dtype=torch.bfloat16))
    log.record(b"s", 2, 3, _row(3), 0, 2, outputs=_row(30))  # rolled back to position 3
    log.record(b"f", 0, 0, _row(4, 2), 1, 3, outputs=_row(40, 2))
    before = {(s, k): log.history(s, k) for s, k in [(b"s", 0), (b"s", 1), (b"s", 2), (b"f", 0)]}
    assert log.memory_bytes < 4096  # offsets, not tensors
    log.close()
    clock.now += 30
    again = _disk_log(tmp_path, clock)  # a restart
    for (s, k), (inputs, span, prompts_kept, outputs) in before.items():
        history = again.history(s, k)
        assert torch.equal(history[0], inputs) and history[1] == span and torch.equal(history[3], outputs)
        assert history[3].dtype == outputs.dtype
        assert (history[2] is None) == (prompts_kept is None)
    assert again.history(b"s", 2)[0][0, :, 0].tolist() == [1, 1, 1, 3]
    assert torch.equal(again.history(b"s", 2)[2], prompts)
    again.record(b"s", 3, 4, _row(5), 0, 2)  # the restarted node goes on appending
    assert again.history(b"s", 3)[0][0, :, 0].tolist() == [1, 1, 1, 3, 5]


def test_segments_are_deleted_once_every_session_in_them_is_past_retention(tmp_path):
    clock = Clock()
    log = _disk_log(tmp_path, clock)
    log.record(b"old", 0, 0, _row(1), 0, 2, outputs=_row(1))
    clock.now += 20
    log.record(b"live", 0, 0, _row(2), 0, 2, outputs=_row(2)).result()  # written (by the writer thread)
    assert len(list(tmp_path.glob("*.audit"))) == 2
    clock.now += 45  # "old" is 65 s old, "live" 45 s
    log.admit(new=True)
    assert log.history(b"old", 0) is None and log.history(b"live", 0) is not None
    assert len(list(tmp_path.glob("*.audit"))) == 1
    assert log.disk_bytes == sum(p.stat().st_size for p in tmp_path.glob("*.audit"))
    clock.now += 16
    log.admit(new=True)
    assert log.history(b"live", 0) is None and not list(tmp_path.glob("*.audit")) and log.disk_bytes == 0


def test_a_long_session_keeps_its_first_inputs_while_old_segments_go(tmp_path):
    """Retention counts from the session's last step (its audits need its first inputs): a live session's records
    in an old segment are copied forward, and the segment goes."""
    clock = Clock()
    log = _disk_log(tmp_path, clock)
    log.record(b"long", 0, 0, _row(1, 4), 0, 2, outputs=_row(1, 4))
    log.record(b"short", 0, 0, _row(9), 0, 2)
    for step in range(1, 20):
        clock.now += 10
        # awaited as a node awaits it before signing the step's receipt (this test's clock runs ahead of the writer)
        log.record(b"long", step, 3 + step, _row(step + 1), 0, 2, outputs=_row(step)).result()
    assert log.history(b"short", 0) is None
    first = min(int(p.stem) for p in tmp_path.glob("*.audit"))
    assert first * 10 > clock.now - 60 - 10  # no segment older than the retention and one bucket
    assert log.history(b"long", 19)[0][0, :, 0].tolist() == [1] * 4 + list(range(2, 21))
    log.close()
    again = _disk_log(tmp_path, clock)
    assert again.history(b"long", 19)[0][0, :, 0].tolist() == [1] * 4 + list(range(2, 21))


def test_a_record_cut_short_by_a_crash_is_ignored_and_cut_off(tmp_path):
    clock = Clock()
    log = _disk_log(tmp_path, clock)
    log.record(b"s", 0, 0, _row(1), 0, 2, outputs=_row(1))
    log.record(b"s", 1, 1, _row(2), 0, 2, outputs=_row(2))
    log.close()
    (path,) = tmp_path.glob("*.audit")
    whole = path.stat().st_size
    os.truncate(path, whole - 100)  # the process died in the middle of writing step 1
    again = _disk_log(tmp_path, clock)
    assert again.history(b"s", 1) is None and torch.equal(again.history(b"s", 0)[3], _row(1))
    again.record(b"s", 1, 1, _row(3), 0, 2, outputs=_row(3))  # appended after the last whole record
    again.close()
    with open(path, "ab") as f:
        f.write(b"\0" * 64)  # zeros a power cut left at the end
    third = _disk_log(tmp_path, clock)
    assert third.history(b"s", 1)[0][0, :, 0].tolist() == [1, 3]


def test_a_damaged_record_is_not_served(tmp_path):
    clock = Clock()
    log = _disk_log(tmp_path, clock)
    log.record(b"s", 0, 0, _row(1), 0, 2, outputs=_row(1)).result()
    (path,) = tmp_path.glob("*.audit")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the output
    path.write_bytes(bytes(data))
    assert log.history(b"s", 0) is None  # checksum: never a wrong output as if it were the one sent


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_full_budget_refuses_new_work_instead_of_dropping_young_records(tmp_path, on_disk):
    """Before issue 21's fix, the log evicted the oldest session to make room, and its audits then failed."""
    clock = Clock()
    step = 2 * _row(0).nbytes + 256
    budget = dict(max_disk_bytes=10 * step, max_bytes=1 << 24) if on_disk else dict(max_bytes=10 * (step + 800))
    log = AuditLog(retention_s=60.0, folder=tmp_path if on_disk else None, clock=clock, bucket_s=10.0, **budget)
    served = 0
    with pytest.raises(NodeRPCError) as error:
        while True:
            log.admit(step, new=True)
            log.record(b"s%d" % served, 0, 0, _row(served), 0, 2, outputs=_row(served))
            served += 1
    assert error.value.code == ErrorCode.CACHE_FULL and "try another node" in str(error.value)
    assert 6 <= served <= 9  # new work stops at 7/8 of the budget
    log.admit(step, new=False)  # an open session's next step still fits
    log.record(b"s0", 1, 1, _row(100), 0, 2, outputs=_row(100))
    while True:  # open sessions go on up to the whole budget, then their steps are refused too
        try:
            log.admit(step, new=False)
        except NodeRPCError as e:
            assert e.code == ErrorCode.CACHE_FULL
            break
        log.record(b"s0", 2, 2, _row(101), 0, 2, outputs=_row(101))
    for s in range(served):  # nothing was dropped
        assert torch.equal(log.history(b"s%d" % s, 0)[3], _row(s))
    clock.now += 61  # past retention: room again
    log.admit(step, new=True)
    assert log.history(b"s0", 0) is None


def test_one_folder_serves_one_log_at_a_time(tmp_path):
    log = _disk_log(tmp_path, Clock())
    with pytest.raises(ValueError, match="--audit-dir"):
        _disk_log(tmp_path, Clock())
    log.close()
    _disk_log(tmp_path, Clock()).close()


def test_a_writer_behind_the_disk_refuses_work_instead_of_growing_memory(tmp_path):
    """Records go to disk through a writer thread (the event loop never waits on the disk); the records waiting for
    it are bounded: past 7/8 of ``max_queue_bytes`` new work is refused, past all of it every step, with a clear
    error, and queued records are still served to audits. Here the writer is held up by holding the log's lock; the
    records are prefill-sized (small ones are written at once while the writer is idle)."""
    clock = Clock()
    tokens = 16
    step = 2 * _row(0, tokens).nbytes
    log = _disk_log(tmp_path, clock, max_queue_bytes=8 * step)
    futures = []
    with log._lock:  # the writer waits for it before each write; this thread may re-enter
        served = 0
        with pytest.raises(NodeRPCError) as error:
            while True:
                log.admit(step, new=True)
                row = _row(served, tokens)
                futures.append(log.record(b"s%d" % served, 0, 0, row, 0, 2, outputs=row))
                served += 1
        assert error.value.code == ErrorCode.CACHE_FULL and "audit writes are behind" in str(error.value)
        assert 5 <= served <= 7 and log.queued_bytes <= 8 * step
        assert torch.equal(log.history(b"s1", 0)[3], _row(1, tokens))  # from the queue
        assert not any(f.done() for f in futures[1:])
    for f in futures:
        f.result(timeout=30)
    assert log.queued_bytes == 0
    log.admit(step, new=True)  # room again
    log.close()
    again = _disk_log(tmp_path, clock)
    assert all(torch.equal(again.history(b"s%d" % s, 0)[3], _row(s, tokens)) for s in range(served))
