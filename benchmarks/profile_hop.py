"""Where one inference hop's time goes: client -> node -> client, split into its stages (median and mean, in us).

Starts a bootstrap peer, one node in a child process with timing hooks (its own process, as in production), and a
client with timing hooks in this process; runs single-token steps of one session and matches the two sides' clock
readings by step number (both read CLOCK_MONOTONIC). Stages:

  client main -> loop      the calling thread hands the step to the client's event loop thread
  loop -> node recv        serialising the request, the transport (direct TCP, or both P2P daemons), the node reading it
  recv -> handler          the node's stream task picks the request up
  handler -> compute       unpacking and checks in the handler, then the hand-off to the compute thread
  compute                  the forward through the span (one batch)
  compute -> handler exit  result back on the node's loop, response built (the step's receipt follows, signed
                           while the next step computes or once the stream goes quiet)
  exit -> sent             writing the response (to the direct lane, or the node's P2P daemon)
  sent -> client loop      the transport back, the client reading it and checking the output
  loop -> main             back to the calling thread (receipts are checked after the step)

and the node event loop's CPU time (``thread_time``: barely moved by other processes' load) in the step's checks and
hand-off (``submit``), and from the round's result to the output's reply (``result -> reply``).

    python benchmarks/profile_hop.py --model tiny --steps 300
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401  (sets the OpenMP wait policy before torch loads)

now = time.perf_counter_ns  # CLOCK_MONOTONIC on Linux: comparable across processes


def serve(args) -> None:
    """The node side: a real Server with hooks around receive, handler step, compute and send."""

    from nectar.node import backend as backend_module
    from nectar.node import steps as steps_module
    from nectar.node.config import NodeConfig
    from nectar.node.server import Server

    steps: dict = {}
    computes: list = []
    last_receive = [0]
    sending = [None]
    from nectar.wire import transport as transport_module

    receive, send = transport_module.receive_frame, transport_module.send_message

    async def timed_receive(*a, **k):  # both lanes read requests through it
        result = await receive(*a, **k)
        last_receive[0] = now()
        return result

    async def timed_send(*a, **k):
        result = await send(*a, **k)
        if sending[0] is not None:
            steps[sending[0]]["sent"], sending[0] = now(), None
        return result

    transport_module.receive_frame, transport_module.send_message = timed_receive, timed_send
    submit_step, finish_step = steps_module.NodeSteps.submit_inference, steps_module.NodeSteps.finish_inference

    def timed_submit(self, message, *args, **kwargs):
        record = steps.setdefault(message.step, {})
        record["recv"], record["enter"] = last_receive[0], now()
        cpu = time.thread_time_ns()
        result = submit_step(self, message, *args, **kwargs)
        record["submit_cpu"] = time.thread_time_ns() - cpu
        return result

    async def timed_finish(self, work, **kwargs):
        try:
            await work.output
        except BaseException:
            pass  # raised again by the step's own finish
        cpu = time.thread_time_ns()  # the loop's CPU time from the round's result to the output's reply: load-proof
        result = await finish_step(self, work, **kwargs)
        record = steps.setdefault(work.step, {})
        record["exit"], record["finish_cpu"] = now(), time.thread_time_ns() - cpu
        sending[0] = work.step
        return result

    steps_module.NodeSteps.submit_inference = timed_submit
    steps_module.NodeSteps.finish_inference = timed_finish
    run_inference = backend_module.SpanBackend.run_inference

    def timed_run(self, tasks):
        began = now()
        result = run_inference(self, tasks)
        computes.append((began, now()))
        return result

    backend_module.SpanBackend.run_inference = timed_run
    config = NodeConfig(
        model=str(args.path),
        blocks=(0, args.blocks),
        host="127.0.0.1",
        initial_peers=[args.peers],
        throughput=1.0,
        num_threads=args.threads,
        key_dir=Path(tempfile.mkdtemp()),
        public_name="profiled",
        announce_period=2,
        device=args.device,
        dtype=args.dtype,
        direct_port=None if args.p2p else 0,
        receipt_signer=args.receipt_signer,
    )
    from nectar.node.cli import node_parser

    sys.setswitchinterval(node_parser().get_default("switch_interval") / 1000)  # as `nectar node` sets it
    server = Server(config)
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    Path(args.out).write_text(json.dumps({"steps": {str(k): v for k, v in steps.items()}, "computes": computes}))
    server.stop()  # its DHT process and P2P daemon would outlive os._exit
    os._exit(0)


def profile(args) -> None:
    import torch
    from common import distributed_model, set_threads

    from nectar.client import inference_session as session_module
    from nectar.node.local_swarm import LocalSwarm

    set_threads(args.threads)
    client: dict = {}
    hop_step = session_module.InferenceSession._hop_step

    async def timed_hop_step(self, hop, inputs, *, step, position):
        record = client.setdefault(step, {})
        record["loop_enter"] = now()
        result = await hop_step(self, hop, inputs, step=step, position=position)
        record["loop_got"] = now()
        return result

    session_module.InferenceSession._hop_step = timed_hop_step
    session_step = session_module.InferenceSession.step

    def timed_session_step(self, hidden_states, prompts=None):  # the route has one hop: the session's step is it
        record = client.setdefault(self.step_index, {})
        record["start"] = now()
        result = session_step(self, hidden_states, prompts)
        record["end"] = now()
        return result

    session_module.InferenceSession.step = timed_session_step
    out = Path(tempfile.mkdtemp()) / "node.json"
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                "--model",
                args.model,
                "--path",
                str(args.path),
                "--blocks",
                str(args.blocks),
                "--threads",
                str(args.threads),
                "--peers",
                swarm.initial_peers[0],
                "--out",
                str(out),
                "--device",
                args.device or "",
                "--dtype",
                args.dtype or "",
                "--receipt-signer",
                args.receipt_signer,
            ]
            + (["--p2p"] if args.p2p else []),
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **common.node_env(args.threads)},
        )
        try:
            assert child.stdout.readline().strip() == "ready", "the profiled node did not start"
            swarm.wait_for_blocks(str(args.path), args.blocks)
            model = distributed_model(args.path, swarm)
            hidden = model.head.embedding_dim
            session = model.inference_session(max_length=args.steps + 20)
            session.step(torch.randn(1, 16, hidden))
            spy = None
            if args.spy:  # sample the node's threads while it serves the steps below
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(child.pid),
                        "--duration",
                        "8",
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--threads",
                        "--output",
                        args.spy,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            for _ in range(args.steps):
                session.step(torch.randn(1, 1, hidden))
            if spy is not None:
                spy.wait()
            session.close()
            model.shutdown()
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
    node = json.loads(out.read_text())
    rows = []
    for step, record in client.items():
        theirs = node["steps"].get(str(step))
        if step < 10 or not theirs or "sent" not in theirs:
            continue
        compute = next(((a, b) for a, b in node["computes"] if theirs["enter"] <= a <= theirs["exit"]), None)
        if compute is None:
            continue
        rows.append(
            {
                "client main -> loop": record["loop_enter"] - record["start"],
                "loop -> node recv": theirs["recv"] - record["loop_enter"],
                "recv -> handler": theirs["enter"] - theirs["recv"],
                "handler -> compute": compute[0] - theirs["enter"],
                "compute": compute[1] - compute[0],
                "compute -> handler exit": theirs["exit"] - compute[1],
                "exit -> sent": theirs["sent"] - theirs["exit"],
                "sent -> client loop": record["loop_got"] - theirs["sent"],
                "loop -> main": record["end"] - record["loop_got"],
                "whole hop": record["end"] - record["start"],
                "node CPU: submit": theirs["submit_cpu"],
                "node CPU: result -> reply": theirs["finish_cpu"],
            }
        )
    print(
        f"\n== One hop, {args.model} blocks 0:{args.blocks}, {len(rows)} single-token steps, {args.threads} thread(s)"
    )
    print(f"   machine: {common.machine_line()} | commit {common.git_commit()}")
    for stage in rows[0]:
        values = [row[stage] / 1e3 for row in rows]
        print(f"   {stage:<26} median {statistics.median(values):8.0f} us   mean {statistics.mean(values):8.0f} us")
    overhead = [(row["whole hop"] - row["compute"]) / 1e3 for row in rows]
    print(
        f"   {'hop minus compute':<26} median {statistics.median(overhead):8.0f} us   "
        f"mean {statistics.mean(overhead):8.0f} us"
    )


def main() -> None:
    parser = common.base_parser(__doc__, results_group="profile_hop")
    parser.add_argument("--blocks", type=int, default=None, help="the profiled node hosts blocks 0:N (default: all)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--p2p", action="store_true", help="no direct TCP lane: every message through the P2P daemons")
    parser.add_argument("--device", default=None, help="the node's device (default: cuda if available)")
    parser.add_argument(
        "--receipt-signer",
        choices=["process", "loop"],
        default="process",
        help="where the profiled node signs its receipts (the node's --receipt-signer)",
    )
    parser.add_argument("--spy", default=None, help="also record a py-spy profile of the node to this file")
    parser.add_argument("--dtype", default=None, help="the node's dtype (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--serve", action="store_true", help=common.argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=common.argparse.SUPPRESS)
    parser.add_argument("--peers", help=common.argparse.SUPPRESS)
    parser.add_argument("--out", help=common.argparse.SUPPRESS)
    args = parser.parse_args()
    args.device, args.dtype = args.device or None, args.dtype or None
    if args.serve:
        serve(args)
        return
    args.blocks = args.blocks or common.llama_config(args.model).num_hidden_layers
    args.path = common.checkpoint(
        args.model,
        dtype="float16" if args.model == "llama2-7b" else "float32",
        device="cuda" if args.model == "llama2-7b" else "cpu",
    )
    profile(args)


if __name__ == "__main__":
    main()
