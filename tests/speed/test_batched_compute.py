"""Batched inference steps (models/families/llama/batching.py) equal unbatched ones, and forward graphs serve the
matching backward.

The reference is a backend built with ``batching=False``: transformers' own decoder layers, one session at a time,
with untouched weights.
"""

from __future__ import annotations

import logging

import pytest
import torch

from nectar.models.fast_path import BatchRunner
from nectar.models.tiny import save_tiny_checkpoint
from nectar.node.backend import SpanBackend

TOLERANCE = 1e-5  # float32


def _backend(path: str, *, batching: bool, start: int = 0, end: int = 4, **kwargs) -> SpanBackend:
    return SpanBackend(
        path, start, end, dtype=torch.float32, device="cpu", show_progress=False, batching=batching, **kwargs
    )


class _Session:
    def __init__(
        self, batched: SpanBackend, plain: SpanBackend, *, batch_size: int, start: int, end: int, max_length: int = 40
    ):
        self.start, self.end, self.position = start, end, 0
        self.batched_caches = batched.new_caches(start, end, batch_size, max_length)
        self.plain_caches = plain.new_caches(start, end, batch_size, max_length)
        self.batch_size = batch_size


def _round(batched, plain, sessions, hidden_by_session, *, positions=None, prompts=None) -> float:
    """One step of every session: batched in one call vs one by one; returns the largest difference."""
    positions = positions or [s.position for s in sessions]
    prompts = prompts or [None] * len(sessions)
    tasks = [
        batched.inference_task(h, s.batched_caches, start=s.start, end=s.end, position=p, prompts=pr)
        for s, h, p, pr in zip(sessions, hidden_by_session, positions, prompts)
    ]
    outputs = batched.run_inference(tasks)
    worst = 0.0
    for session, hidden, position, prompt, output in zip(sessions, hidden_by_session, positions, prompts, outputs):
        expected = plain.inference_step(
            hidden, session.plain_caches, start=session.start, end=session.end, position=position, prompts=prompt
        )
        assert output.shape == expected.shape == hidden.shape
        worst = max(worst, (output - expected).abs().max().item())
        session.position = position + hidden.shape[1]
    return worst


def test_batched_steps_equal_unbatched_at_mixed_lengths_and_positions(tiny_llama):
    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    assert batched.batch_runner is not None and plain.batch_runner is None
    hidden = batched.hidden_size
    torch.manual_seed(0)
    sessions = [_Session(batched, plain, batch_size=b, start=0, end=4) for b in (1, 2, 1, 3)]
    # each row: one round; each entry: new tokens of that session (prefills and decodes mixed in one forward)
    schedule = [(5, 3, 1, 7), (1, 1, 1, 2), (1, 4, 1, 1), (2, 1, 6, 1), (1, 1, 1, 1), (1, 1, 1, 1)]
    worst = 0.0
    for tokens in schedule:
        inputs = [torch.randn(s.batch_size, t, hidden) for s, t in zip(sessions, tokens)]
        worst = max(worst, _round(batched, plain, sessions, inputs))
    # a replay: two sessions roll back (a client retrying after a failure downstream) while the others go on
    inputs = [torch.randn(s.batch_size, t, hidden) for s, t in zip(sessions, (3, 1, 2, 1))]
    positions = [2, sessions[1].position, 1, sessions[3].position]
    worst = max(worst, _round(batched, plain, sessions, inputs, positions=positions))
    assert worst <= TOLERANCE, worst


def test_rotary_rows_from_the_tables_equal_the_rotary_module(tiny_llama):
    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    runner = batched.batch_runner
    assert runner.cos_table is not None and len(runner.cos_table) == runner.spans[0].config.max_position_embeddings
    positions = torch.tensor([0, 5, 17, len(runner.cos_table) - 1])
    x = torch.zeros(len(positions), batched.hidden_size)
    from_tables = runner.rotary_at(x, positions, end=len(runner.cos_table))
    from_module = runner.rotary_at(x, positions, end=len(runner.cos_table) + 1)  # past the tables: the module
    for table_rows, module_rows in zip(from_tables, from_module):
        torch.testing.assert_close(table_rows, module_rows, rtol=0, atol=1e-6)
    # a whole session decoded without the tables (as a rotary type they do not cover) matches the plain path too
    runner.cos_table = runner.signed_sin_table = None
    torch.manual_seed(3)
    session = _Session(batched, plain, batch_size=1, start=0, end=4)
    worst = max(
        _round(batched, plain, [session], [torch.randn(1, tokens, batched.hidden_size)]) for tokens in (4, 1, 1, 1)
    )
    assert worst <= TOLERANCE, worst


@pytest.mark.parametrize("native", [True, False], ids=["c-kernel", "padded-sdpa"])
def test_single_token_rounds_share_one_attention(tiny_llama, monkeypatch, native):
    """Decode rounds (every session one new token, batch 1) take one attention call for all sessions: in C over each
    session's own cache (CPU, float32), or one padded SDPA (NECTAR_NATIVE_ATTENTION=off). Both exact, GQA included
    (the tiny model has 4 query heads on 2 key/value heads), and each writes every session's new key and value."""
    monkeypatch.setenv("NECTAR_NATIVE_ATTENTION", "on" if native else "off")
    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    runner = batched.batch_runner
    assert (runner.native_attention is not None) is native
    routes = {"c": 0, "padded": 0}
    for route, name in (("c", "_native_decode_attention"), ("padded", "_decode_attention")):
        original = getattr(runner, name)

        def counted(*args, _original=original, _route=route):
            answer = _original(*args)
            routes[_route] += answer is not None
            return answer

        monkeypatch.setattr(runner, name, counted)
    hidden = batched.hidden_size
    torch.manual_seed(1)
    sessions = [_Session(batched, plain, batch_size=1, start=0, end=4) for _ in range(5)]
    worst = _round(batched, plain, sessions, [torch.randn(1, t, hidden) for t in (5, 3, 9, 1, 2)])
    for _ in range(4):  # caches of five different lengths in each round
        worst = max(worst, _round(batched, plain, sessions, [torch.randn(1, 1, hidden) for _ in sessions]))
    assert [s.position for s in sessions] == [9, 7, 13, 5, 6]
    assert worst <= TOLERANCE, worst
    blocks = 4
    assert routes == ({"c": 4 * blocks, "padded": 0} if native else {"c": 0, "padded": 4 * blocks})
    for session in sessions:  # each block's cache holds what one-by-one steps wrote there
        assert len(session.batched_caches) == len(session.plain_caches) == blocks
        for mine, theirs in zip(session.batched_caches, session.plain_caches):
            assert mine.length == theirs.length == session.position
            assert (mine.read(mine.length) - theirs.read(theirs.length)).abs().max().item() <= TOLERANCE


def test_batched_sub_spans_and_prompted_first_steps(tiny_llama):
    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    hidden = batched.hidden_size
    torch.manual_seed(1)
    # a client may ask for any sub-span of what a node hosts; sessions of one sub-span batch together
    sessions = [_Session(batched, plain, batch_size=1, start=1, end=3) for _ in range(3)]
    worst = 0.0
    for tokens in [(4, 1, 2), (1, 1, 1), (1, 3, 1)]:
        worst = max(worst, _round(batched, plain, sessions, [torch.randn(1, t, hidden) for t in tokens]))
    # deep prompts ride on a session's first step (run alone), its later steps batch with the rest
    prompted = [_Session(batched, plain, batch_size=2, start=0, end=4) for _ in range(2)]
    prompts = [torch.randn(4, 2, 3, hidden) * 0.5, torch.randn(4, 1, 2, hidden) * 0.5]
    worst = max(worst, _round(batched, plain, prompted, [torch.randn(2, 5, hidden) for _ in prompted], prompts=prompts))
    for _ in range(3):
        worst = max(worst, _round(batched, plain, prompted, [torch.randn(2, 1, hidden) for _ in prompted]))
    assert worst <= TOLERANCE, worst


def test_batched_steps_match_a_full_causal_forward(tiny_llama):
    """Independent of the generic cache path: steps through the cache equal one stateless forward of the sequence."""
    backend = _backend(tiny_llama, batching=True)
    torch.manual_seed(2)
    sequences = [torch.randn(1, 9, backend.hidden_size), torch.randn(2, 6, backend.hidden_size)]
    caches = [backend.new_caches(0, 4, s.shape[0], 16) for s in sequences]
    outputs = [[], []]
    for begin, end in [(0, 4), (4, 5), (5, 6)]:
        tasks = [
            backend.inference_task(s[:, begin:end], c, start=0, end=4, position=begin)
            for s, c in zip(sequences, caches)
        ]
        for index, output in enumerate(backend.run_inference(tasks)):
            outputs[index].append(output)
    for sequence, pieces in zip(sequences, outputs):
        expected = backend.forward(sequence[:, :6], start=0, end=4)
        torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=TOLERANCE, rtol=0)


def test_each_family_chooses_its_path_and_the_node_logs_it(tiny_llama, tmp_path, caplog):
    """The node asks the family for its fast path (``ModelFamily.batch_runner``): Llama has one, BLOOM has none and
    takes the generic path, whose rounds still give each session its own output; the node logs which it chose."""
    bloom = str(save_tiny_checkpoint(tmp_path / "bloom", "bloom", seed=1))
    with caplog.at_level(logging.INFO, logger="nectar.node.backend"):
        llama_backend, bloom_backend = _backend(tiny_llama, batching=True), _backend(bloom, batching=True)
    assert isinstance(llama_backend.batch_runner, BatchRunner) and bloom_backend.batch_runner is None
    assert "Inference steps of llama blocks: batched Llama runner" in caplog.text
    assert "Inference steps of bloom blocks: generic path" in caplog.text
    torch.manual_seed(8)
    plain = _backend(bloom, batching=False)
    sessions = [_Session(bloom_backend, plain, batch_size=b, start=0, end=4) for b in (1, 2)]
    hidden = bloom_backend.hidden_size
    for tokens in ((4, 2), (1, 1)):  # prefills, then a decode round
        inputs = [torch.randn(s.batch_size, t, hidden) for s, t in zip(sessions, tokens)]
        assert _round(bloom_backend, plain, sessions, inputs) <= TOLERANCE


def test_sliding_window_models_take_the_generic_path(tiny_mistral):
    backend = _backend(tiny_mistral, batching=True)
    assert backend.batch_runner is None  # windowed attention is not in the batched path
    plain = _backend(tiny_mistral, batching=False)
    sessions = [_Session(backend, plain, batch_size=1, start=0, end=4) for _ in range(2)]
    worst = 0.0
    for tokens in [(8, 3), (1, 1), (1, 5)]:
        worst = max(worst, _round(backend, plain, sessions, [torch.randn(1, t, backend.hidden_size) for t in tokens]))
    assert worst <= TOLERANCE


def test_a_step_past_max_length_changes_no_cache(tiny_llama):
    backend = _backend(tiny_llama, batching=True)
    small, big = backend.new_caches(0, 4, 1, 4), backend.new_caches(0, 4, 1, 16)
    hidden = torch.randn(1, 6, backend.hidden_size)
    with pytest.raises(Exception, match="cached tokens"):
        backend.run_inference(
            [
                backend.inference_task(hidden, small, start=0, end=4, position=0),
                backend.inference_task(hidden, big, start=0, end=4, position=0),
            ]
        )
    assert small[0].length == 0 and big[0].length == 0  # nothing half-applied
    backend.run_inference([backend.inference_task(hidden, big, start=0, end=4, position=0)])
    assert big[0].length == 6


# ---- forward graphs kept for the backward --------------------------------------------------------------------


def test_backward_reuses_the_forward_graph_and_matches_recomputation(tiny_llama):
    backend = _backend(tiny_llama, batching=True)
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, backend.hidden_size)
    grad = torch.randn_like(hidden)
    prompts = torch.randn(4, 2, 3, backend.hidden_size) * 0.1
    for deep in (None, prompts):
        backend.forward(hidden, start=0, end=4, prompts=deep)
        assert backend.graphs.nbytes > 0
        hits = backend.graphs.hits
        reused = backend.backward(hidden, grad, start=0, end=4, prompts=deep)
        assert backend.graphs.hits == hits + 1 and backend.graphs.nbytes == 0
        recomputed = backend.backward(hidden, grad, start=0, end=4, prompts=deep)  # nothing kept: recomputes
        assert backend.graphs.misses >= 1
        torch.testing.assert_close(reused[0], recomputed[0], atol=0, rtol=0)
        if deep is not None:
            torch.testing.assert_close(reused[1], recomputed[1], atol=0, rtol=0)


def test_backward_with_other_inputs_never_uses_a_kept_graph(tiny_llama):
    backend = _backend(tiny_llama, batching=True)
    hidden = torch.randn(1, 5, backend.hidden_size)
    backend.forward(hidden, start=0, end=4)
    other = hidden.clone()
    other[0, 0, 0] += 1e-3
    grad = torch.randn_like(hidden)
    expected = _backend(tiny_llama, batching=False).backward(other, grad, start=0, end=4)
    got = backend.backward(other, grad, start=0, end=4)
    assert backend.graphs.hits == 0
    torch.testing.assert_close(got[0], expected[0], atol=TOLERANCE, rtol=0)
    backend.backward(hidden, grad, start=1, end=4)  # a different sub-span is another graph too
    assert backend.graphs.hits == 0


def test_kept_graphs_stay_within_their_byte_budget(tiny_llama):
    probe = _backend(tiny_llama, batching=True)
    probe.forward(torch.randn(1, 8, probe.hidden_size), start=0, end=4)
    one_graph = probe.graphs.nbytes
    backend = _backend(tiny_llama, batching=True, training_cache_bytes=int(one_graph * 2.5))
    inputs = [torch.randn(1, 8, backend.hidden_size) for _ in range(4)]
    for hidden in inputs:
        backend.forward(hidden, start=0, end=4)
        assert backend.graphs.nbytes <= int(one_graph * 2.5)
    grad = torch.randn_like(inputs[0])
    backend.backward(inputs[0], grad, start=0, end=4)  # the oldest was evicted
    assert backend.graphs.hits == 0
    backend.backward(inputs[-1], grad, start=0, end=4)
    assert backend.graphs.hits == 1
    disabled = _backend(tiny_llama, batching=True, training_cache_bytes=0)
    disabled.forward(inputs[0], start=0, end=4)
    assert disabled.graphs.nbytes == 0


def test_recorded_decode_rounds_equal_one_by_one_steps(tiny_llama):
    """The graph-safe decode round (node/graphs.py over models/families/llama/graphs.py; recorded as a CUDA graph on
    GPUs) run eagerly on the CPU: rounds of several sessions (different cache sizes, a sub-span, a rollback, rounds of
    only some of the sessions, one leaving) equal unbatched steps."""
    import gc

    from nectar.node.graphs import GraphedDecoder

    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    static = batched.decode_graphs = GraphedDecoder(batched.batch_runner, capture=False, record_after=2)
    torch.manual_seed(4)
    hidden = batched.hidden_size
    full = [_Session(batched, plain, batch_size=1, start=0, end=4, max_length=m) for m in (40, 24, 31)]
    sub = [_Session(batched, plain, batch_size=1, start=1, end=3)]
    for index, prefill in enumerate((5, 3, 7, 2)):
        _round(batched, plain, [(full + sub)[index]], [torch.randn(1, prefill, hidden)])

    def rounds(groups, count: int, replayed) -> float:
        """``count`` rounds of each group; ``replayed``: whether each group's rounds replay (one per group, or all)"""
        worst = 0.0
        for _ in range(count):
            for group, replays_it in zip(groups, replayed if isinstance(replayed, tuple) else [replayed] * len(groups)):
                replays = static.replays
                worst = max(worst, _round(batched, plain, group, [torch.randn(1, 1, hidden) for _ in group]))
                assert static.replays - replays == replays_it
        return worst

    # three sessions: eager at first sight, recorded at the second; a lone session (the sub-span) at once
    worst = rounds([full, sub], 1, replayed=(0, 1))
    worst = max(worst, rounds([full, sub], 3, replayed=1))
    rolled = full[1]  # a client rolls back two tokens (retry or replay): the same recorded round serves it
    rolled.position -= 2
    for cache in rolled.batched_caches + rolled.plain_caches:
        cache.crop(rolled.position)
    worst = max(worst, rounds([full], 2, replayed=1))
    assert len(static._graphs) == 2 and static.recorded == 2  # one per composition: three sessions, the sub-span
    # rounds of some of the three replay their round; the absent one's throwaway token never reaches its output
    worst = max(worst, rounds([full[:2], [full[2]], full[1:], full], 2, replayed=1))
    assert static.recorded == 2
    assert worst <= TOLERANCE, worst
    del full[2], sub[0], rolled  # their caches die, and the graphs that used them go with them
    gc.collect()
    rounds([full], 1, replayed=0)
    assert len(static._graphs) == 0
    rounds([full], 1, replayed=1)
    assert len(static._graphs) == 1


def test_rounds_that_split_replay_one_recording_of_every_active_session(tiny_llama):
    """Sessions that never share a round (rounds split [A, B], [C], [A, B], ...) still get one recorded round: it is
    recorded for every session active lately, and each split round replays it."""
    from nectar.node.graphs import GraphedDecoder

    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    static = batched.decode_graphs = GraphedDecoder(batched.batch_runner, capture=False, record_after=2)
    torch.manual_seed(5)
    hidden = batched.hidden_size
    sessions = [_Session(batched, plain, batch_size=1, start=0, end=4) for _ in range(3)]
    for session, prefill in zip(sessions, (4, 6, 2)):
        _round(batched, plain, [session], [torch.randn(1, prefill, hidden)])
    worst, replayed = 0.0, []
    for _ in range(5):
        for group in (sessions[:2], sessions[2:]):
            replays = static.replays
            worst = max(worst, _round(batched, plain, group, [torch.randn(1, 1, hidden) for _ in group]))
            replayed.append(static.replays - replays)
    # [A, B] is the first sighting of A, B and C (C prefilled lately, so it counts), [C] the second: from then on one
    # recording of all three serves both halves
    assert replayed == [0] + [1] * 9
    assert static.recorded == 1 and len(next(iter(static._graphs.values())).sessions) == 3
    assert next(iter(static._graphs.values())).pools is not None  # equal cache sizes: one key/value tensor per block
    assert worst <= TOLERANCE, worst


def test_sessions_that_open_together_share_their_first_recording(tiny_llama):
    """Sessions whose first decode steps come in separate rounds (16 clients never all arrive at once) are recorded
    once, at the first of those rounds: their prefills made them active. Before, each group of arrivals not covered
    by the last recording made a new one (three per run of 16 sessions on an H100, 60-110 ms each)."""
    from nectar.node.graphs import GraphedDecoder

    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    static = batched.decode_graphs = GraphedDecoder(batched.batch_runner, capture=False)  # record at once
    torch.manual_seed(7)
    hidden = batched.hidden_size
    sessions = [_Session(batched, plain, batch_size=1, start=0, end=4) for _ in range(4)]
    worst = 0.0
    for session, prefill in zip(sessions, (3, 5, 2, 4)):
        worst = max(worst, _round(batched, plain, [session], [torch.randn(1, prefill, hidden)]))
    for group in ([sessions[1]], sessions[2:], sessions[:2], sessions, [sessions[0], sessions[3]]):
        replays = static.replays
        worst = max(worst, _round(batched, plain, group, [torch.randn(1, 1, hidden) for _ in group]))
        assert static.replays - replays == 1
    assert static.recorded == 1 and len(next(iter(static._graphs.values())).sessions) == 4
    assert worst <= TOLERANCE, worst


def test_pooled_caches_stay_the_sessions_own(tiny_llama):
    """A recorded round of sessions with equal cache sizes moves their caches into one tensor per block
    (``GraphedDecoder._pool``): the eager path (a prefill after a rollback), a lone session's own recording and a
    later pool of other sessions keep reading and writing the same keys/values, and the lone session's earlier
    recording over its old buffer is dropped."""
    from nectar.node.graphs import GraphedDecoder

    batched, plain = _backend(tiny_llama, batching=True), _backend(tiny_llama, batching=False)
    static = batched.decode_graphs = GraphedDecoder(batched.batch_runner, capture=False)  # record at once
    torch.manual_seed(6)
    hidden = batched.hidden_size
    a, b, c = (_Session(batched, plain, batch_size=1, start=0, end=4) for _ in range(3))
    worst = _round(batched, plain, [a], [torch.randn(1, 3, hidden)])
    worst = max(worst, _round(batched, plain, [a], [torch.randn(1, 1, hidden)]))  # a alone: its own recording
    alone, replays = set(static._graphs), static.replays
    for session, prefill in ((b, 5), (c, 2)):  # b and c open after a's recording
        worst = max(worst, _round(batched, plain, [session], [torch.randn(1, prefill, hidden)]))
    for _ in range(3):  # a and b: recorded at first sight, pooled (a's recording over its old buffer goes)
        worst = max(worst, _round(batched, plain, [a, b], [torch.randn(1, 1, hidden) for _ in range(2)]))
    assert static.replays - replays == 3
    assert not alone & set(static._graphs)
    pool = next(entry for entry in static._graphs.values() if entry.pools is not None).pools[0]
    assert a.batched_caches[0].buffer.data_ptr() in {row.data_ptr() for row in pool}
    a.position -= 2  # a rolls back and sends three tokens: the eager path writes into the pool's row
    for cache in a.batched_caches + a.plain_caches:
        cache.crop(a.position)
    worst = max(worst, _round(batched, plain, [a, b], [torch.randn(1, 3, hidden), torch.randn(1, 1, hidden)]))
    for _ in range(3):  # then b and c: pooled again, out of the first pool
        worst = max(worst, _round(batched, plain, [a, b], [torch.randn(1, 1, hidden) for _ in range(2)]))
        worst = max(worst, _round(batched, plain, [b, c], [torch.randn(1, 1, hidden) for _ in range(2)]))
        worst = max(worst, _round(batched, plain, [a], [torch.randn(1, 1, hidden)]))
    assert static.replays > 6
    assert worst <= TOLERANCE, worst


def test_a_forward_without_backward_keeps_no_graph(tiny_llama):
    backend = _backend(tiny_llama, batching=True)
    hidden = torch.randn(2, 6, backend.hidden_size)
    kept = backend.forward(hidden, start=0, end=4)
    plain = backend.forward(hidden, start=0, end=4, keep_graph=False)  # request metadata {"backward": false}
    assert backend.graphs.nbytes > 0 and len(backend.graphs._entries) == 1
    torch.testing.assert_close(plain, kept, atol=0, rtol=0)
