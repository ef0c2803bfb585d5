"""Forward and backward through the swarm, as a differentiable function (for prompt tuning and fine-tuning).

Autograd sees one op: forward sends the hidden states hop by hop through the forward RPC and keeps each hop's
input; backward walks the same hops in reverse through the backward RPC (nodes recompute their activations, so
they keep no training state). A failed hop is retried on another route for the same blocks.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from nectar.client.config import ClientConfig
from nectar.client.payments import ReceiptError, Wallet
from nectar.client.routing import RemoteSequenceManager, RemoteSpan
from nectar.wire.dht import ClientRuntime
from nectar.wire.messages import BackwardCall, ForwardCall
from nectar.wire.protocol import RPC_BACKWARD, RPC_FORWARD, module_uid
from nectar.wire.receipts import SESSION_NONCE_BYTES, ReceiptKind, bind_session, model_id_hash
from nectar.wire.stubs import call_backward, call_forward

logger = logging.getLogger(__name__)


class RemoteCaller:
    """Unary forward/backward calls to single hops, with receipts checked and vouchers attached."""

    def __init__(self, manager: RemoteSequenceManager, runtime: ClientRuntime, wallet: Wallet, config: ClientConfig):
        self.manager, self.runtime, self.wallet, self.config = manager, runtime, wallet, config
        self.session_id = os.urandom(16)
        self.step = 0

    def call(self, method: str, span: RemoteSpan, tensors: list[torch.Tensor], *, receipt_inputs: torch.Tensor):
        """``method``: RPC_FORWARD (tensors [hidden] (+ [prompts])) or RPC_BACKWARD ([hidden, grad] (+ [prompts]));
        returns the node's output tensors once its receipt is checked."""
        uid = module_uid(self.manager.model_id, span.start, span.end)
        step = self.step
        fields = dict(
            client=self.wallet.address,
            session_id=self.session_id,
            step=step,
            voucher=self.wallet.voucher_for(span.info.eth_address, credit_limit=span.info.credit_limit),
            adapter=self.manager.active_adapter,
        )
        self.step += 1
        p2p, options = self.runtime.p2p, dict(direct=self.config.direct, timeout=self.config.request_timeout)
        # signed with the paying key for this node, per call: nodes bill only the signer (issue 22)
        key, where = self.wallet.private_key, dict(node=span.info.eth_address, peer_id=str(span.peer_id))
        if method == RPC_FORWARD:
            hidden, prompts = tensors[0], (tensors[1] if len(tensors) > 1 else None)
            call = ForwardCall(uid, hidden, prompts, **fields).signed(key, **where)
            call = call_forward(p2p, span.peer_id, span.info, call, **options)
        elif method == RPC_BACKWARD:
            prompts = tensors[2] if len(tensors) > 2 else None
            call = BackwardCall(uid, tensors[0], tensors[1], prompts, **fields).signed(key, **where)
            call = call_backward(p2p, span.peer_id, span.info, call, **options)
        else:
            raise ValueError(f"RemoteCaller calls {RPC_FORWARD} or {RPC_BACKWARD}, not {method!r}")
        began = time.perf_counter()
        reply = self.runtime.run(call, timeout=self.config.request_timeout + 5)
        elapsed = time.perf_counter() - began
        outputs = [reply.output] if method == RPC_FORWARD else reply.tensors
        if not all(torch.isfinite(o).all() for o in outputs):
            raise ValueError(f"{span} returned a malformed output")
        if reply.receipt is not None or self.config.verify_receipts:
            nonce = reply.session_nonce  # the node binds each call's receipt to a nonce of its own
            if nonce is not None and (not isinstance(nonce, bytes) or len(nonce) != SESSION_NONCE_BYTES):
                raise ReceiptError(f"{span} answered with a malformed session_nonce {nonce!r:.80}")
            self.wallet.check_receipt(
                reply.receipt or {},
                node_address=span.info.eth_address,
                price_per_block=span.info.price_per_token,
                start=span.start,
                end=span.end,
                inputs=receipt_inputs,
                outputs=outputs[0],
                session_id=bind_session(self.session_id, nonce) if nonce is not None else None,
                verify=self.config.verify_receipts,
                descriptor=reply.fingerprint,
                dtype=span.info.dtype,
                quant=span.info.quant,
                model_id=model_id_hash(self.manager.model_id),
                step=step,
                kind=ReceiptKind.FORWARD if method == RPC_FORWARD else ReceiptKind.BACKWARD,
                adapter=self.manager.active_adapter is not None,
            )
        if method == RPC_FORWARD:  # what routing may believe of the node's speed (its announcement is a claim)
            self.manager.observe(span.peer_id, tensors[0].shape[0] * tensors[0].shape[1] * span.length, elapsed)
        return outputs

    def with_retries(self, function, start: int, end: int):
        last_error = None
        for attempt in range(self.config.max_retries + 1):
            route = self.manager.make_training_route(start, end)
            self.wallet.pair([span.info.eth_address for span in route])
            try:
                return function(route)
            except Exception as e:  # a hop failed: avoid it and route again
                last_error = e
                failed = getattr(e, "span", None) or route[0]
                self.manager.ban(failed.peer_id, f"{type(e).__name__}: {e}", timeout=self.config.request_timeout)
        raise RuntimeError(f"Forward/backward through blocks {start}:{end} failed: {last_error}")


class _HopError(Exception):
    def __init__(self, span, error):
        super().__init__(f"{span}: {error}")
        self.span = span


def _remote_forward(caller: RemoteCaller, hidden: torch.Tensor, prompts: torch.Tensor | None):
    """Returns (output, [(span, hop input)]) over a fresh training route."""

    def run(route):
        x, saved = hidden, []
        for span in route:
            tensors = [x] + ([prompts[span.start : span.end]] if prompts is not None else [])
            try:
                (y,) = caller.call(RPC_FORWARD, span, tensors, receipt_inputs=x)[:1]
            except (ReceiptError, Exception) as e:
                raise _HopError(span, e)
            saved.append((span, x))
            x = y
        return x, saved

    return caller.with_retries(run, 0, caller.manager.num_blocks)


def _remote_backward(caller: RemoteCaller, saved, grad_output: torch.Tensor, prompts: torch.Tensor | None):
    grad = grad_output
    grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
    for span, x in reversed(saved):
        tensors = [x, grad] + ([prompts[span.start : span.end]] if prompts is not None else [])
        try:
            outputs = caller.call(RPC_BACKWARD, span, tensors, receipt_inputs=grad)
        except Exception as e:
            # the span's node is gone: recompute this part of the chain on another route, then backprop there
            caller.manager.ban(span.peer_id, str(e), timeout=caller.config.request_timeout)
            outputs = _backward_with_new_route(caller, span, x, grad, prompts)
        grad = outputs[0]
        if grad_prompts is not None:
            grad_prompts[span.start : span.end] += outputs[1]
    return grad, grad_prompts


def _backward_with_new_route(caller, span, x, grad, prompts):
    def run(route):
        inputs, current = [], x
        for hop in route:
            tensors = [current] + ([prompts[hop.start : hop.end]] if prompts is not None else [])
            inputs.append(current)
            current = caller.call(RPC_FORWARD, hop, tensors, receipt_inputs=current)[0]
        g, grads_prompts = grad, []
        for hop, hop_input in zip(reversed(route), reversed(inputs)):
            tensors = [hop_input, g] + ([prompts[hop.start : hop.end]] if prompts is not None else [])
            out = caller.call(RPC_BACKWARD, hop, tensors, receipt_inputs=g)
            g = out[0]
            grads_prompts.append(out[1] if prompts is not None else None)
        merged = torch.cat(grads_prompts[::-1], dim=0) if prompts is not None else None
        return [g] + ([merged] if merged is not None else [])

    return caller.with_retries(run, span.start, span.end)


class _RemoteSequentialFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, caller: RemoteCaller):
        output, saved = _remote_forward(
            caller, hidden.detach().float().cpu(), prompts.detach().float().cpu() if prompts is not None else None
        )
        ctx.caller, ctx.saved_hops = caller, saved
        ctx.save_for_backward(prompts if prompts is not None else torch.empty(0))
        ctx.has_prompts = prompts is not None
        return output.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (prompts,) = ctx.saved_tensors
        prompts = prompts.detach().float().cpu() if ctx.has_prompts else None
        grad_hidden, grad_prompts = _remote_backward(ctx.caller, ctx.saved_hops, grad_output.float().cpu(), prompts)
        return grad_hidden, grad_prompts, None


class RemoteSequential(torch.nn.Module):
    """All of a model's transformer blocks, run remotely; ``forward(hidden, prompts=None)`` is differentiable."""

    def __init__(self, caller: RemoteCaller):
        super().__init__()
        self.caller = caller

    def forward(self, hidden_states: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteSequentialFunction.apply(hidden_states, prompts, self.caller)
