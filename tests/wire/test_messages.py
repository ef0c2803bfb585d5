"""The protocol's messages (wire/messages.py): byte-identical to the dicts clients and nodes have always sent, and
each malformed field refused on decode with the right ErrorCode."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from nectar.wire.messages import (
    AuditCall,
    AuditReply,
    BackwardCall,
    Cancel,
    Flush,
    ForwardCall,
    ForwardReply,
    InfoCall,
    Open,
    Opened,
    Pay,
    Push,
    PushAck,
    PushMissing,
    PushTarget,
    ReceiptMessage,
    Step,
    StepReply,
    decode_inference_reply,
    decode_inference_request,
)
from nectar.wire.protocol import (
    MAX_METADATA_BYTES,
    ErrorCode,
    NodeRPCError,
    make_request,
    make_response,
    pack_metadata,
    pack_tensors,
    unpack_metadata,
)

UID = "model[0:4]"
SID = b"s" * 16
CLIENT = "0x" + "ab" * 20
VOUCHER = {"voucher": {"client": CLIENT}, "signature": "0x00"}


def _bytes(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def test_requests_are_byte_identical_to_the_hand_built_dicts():
    x, prompts = torch.randn(1, 2, 8), torch.randn(4, 1, 3, 8)
    token, push_token = b"t" * 16, b"p" * 16
    same = [
        (
            Open(
                UID, SID, max_length=16, batch_size=1, client=CLIENT, separate_receipts=True, push_token=push_token
            ).to_request(),
            make_request(
                UID,
                [],
                {
                    "type": "open",
                    "session_id": SID,
                    "max_length": 16,
                    "batch_size": 1,
                    "client": CLIENT,
                    "receipts": "separate",
                    "push_token": push_token,
                },
            ),
        ),
        (
            Step(
                SID,
                3,
                position=5,
                hidden=x,
                prompts=prompts,
                voucher=VOUCHER,
                push_to=PushTarget("127.0.0.1:5000", token),
            ).to_request(UID),
            make_request(
                UID,
                [x, prompts],
                {
                    "type": "step",
                    "session_id": SID,
                    "step": 3,
                    "position": 5,
                    "voucher": VOUCHER,
                    "push_to": {"address": "127.0.0.1:5000", "token": token},
                },
            ),
        ),
        (
            Step(SID, 3, position=5, pushed=True).to_request(UID),
            make_request(UID, [], {"type": "step", "session_id": SID, "step": 3, "position": 5, "pushed": True}),
        ),
        (
            Pay(SID, VOUCHER).to_request(UID),
            make_request(UID, [], {"type": "pay", "session_id": SID, "voucher": VOUCHER}),
        ),
        (Flush(SID).to_request(UID), make_request(UID, [], {"type": "flush", "session_id": SID})),
        (Cancel(SID, 3).to_request(UID), make_request(UID, [], {"type": "cancel", "session_id": SID, "step": 3})),
        (
            ForwardCall(UID, x, client=CLIENT, session_id=SID, step=2, voucher=VOUCHER).to_request(),
            make_request(UID, [x], {"client": CLIENT, "session_id": SID, "step": 2, "voucher": VOUCHER}),
        ),
        (
            ForwardCall(UID, x, client=CLIENT, session_id=SID, step=0).to_request(),
            make_request(UID, [x], {"client": CLIENT, "session_id": SID, "step": 0}),
        ),
        (
            BackwardCall(UID, x, x, prompts, client=CLIENT, session_id=SID, step=1).to_request(),
            make_request(UID, [x, x, prompts], {"client": CLIENT, "session_id": SID, "step": 1}),
        ),
        (AuditCall(UID, SID, 7).to_request(), make_request(UID, [], {"session_id": SID, "step": 7})),
        (InfoCall().to_request(), make_request("", [], {})),
        (
            Push(SID, 4, token, x).to_request(),
            runtime_pb2.ExpertRequest(
                tensors=pack_tensors([x]), metadata=pack_metadata({"session_id": SID, "step": 4, "token": token})
            ),
        ),
    ]
    for typed, hand_built in same:
        assert _bytes(typed) == _bytes(hand_built), typed


def test_replies_are_byte_identical_and_decode_back():
    y = torch.randn(1, 2, 8)
    receipt = {"receipt": {"step": 1}, "signature": "0x01"}
    same = [
        (Opened(100).to_response(), make_response([], {"type": "opened", "cache_tokens_left": 100})),
        (
            StepReply(y, receipt, b"fp", cache_tokens_left=9).to_response(),
            make_response([y], {"receipt": receipt, "fingerprint": b"fp", "cache_tokens_left": 9}),
        ),
        (
            StepReply(y, receipt_follows=True, cache_tokens_left=9).to_response(pack_tensors([y])),
            make_response([y], {"receipt_follows": True, "cache_tokens_left": 9}),
        ),
        (
            ReceiptMessage(1, receipt, b"fp").to_response(),
            make_response([], {"type": "receipt", "step": 1, "receipt": receipt, "fingerprint": b"fp"}),
        ),
        (PushMissing().to_response(), make_response([], {"push_missing": True})),
        (PushAck().to_response(), make_response([], {"ok": True})),
        (ForwardReply(y, receipt, b"fp").to_response(), make_response([y], {"receipt": receipt, "fingerprint": b"fp"})),
        (AuditReply(y, 0, 4).to_response(), make_response([y], {"start": 0, "end": 4, "outputs": False})),
        (
            AuditReply(y, 0, 4, outputs=y * 2).to_response(),
            make_response([y, y * 2], {"start": 0, "end": 4, "outputs": True}),
        ),
    ]
    for typed, hand_built in same:
        assert _bytes(typed) == _bytes(hand_built), typed
    replies = [decode_inference_reply(typed) for typed, _ in same[:5]]
    assert [type(r) for r in replies] == [Opened, StepReply, StepReply, ReceiptMessage, PushMissing]
    assert replies[1].receipt == receipt and not replies[1].receipt_follows and torch.equal(replies[1].output, y)
    assert replies[2].receipt_follows and replies[3].step == 1
    with pytest.raises(ValueError):
        decode_inference_reply(make_response([], {"cache_tokens_left": 3}))  # a step answer without its output


def test_a_riding_receipt_decodes_with_its_answer_and_a_malformed_one_is_refused():
    y = torch.randn(1, 1, 8)
    riding = ReceiptMessage(4, {"receipt": {"step": 4}, "signature": "0x01"}, b"fp")
    answer = StepReply(y, receipt_follows=True, cache_tokens_left=9, previous=riding).to_response()
    assert _bytes(answer) == _bytes(
        make_response([y], {"receipt_follows": True, "cache_tokens_left": 9, "previous_receipt": riding.fields()})
    )
    decoded = decode_inference_reply(answer)
    assert decoded.previous == riding and decoded.receipt_follows and torch.equal(decoded.output, y)
    assert decode_inference_reply(StepReply(y, receipt_follows=True).to_response()).previous is None
    for bad in (7, [4, {}, b"fp"], "receipt"):
        with pytest.raises(ValueError, match="previous_receipt must be a map"):
            decode_inference_reply(make_response([y], {"receipt_follows": True, "previous_receipt": bad}))
    opened = Open.decode(Open(UID, SID, max_length=16, separate_receipts=True, receipts_ride=True).to_request())
    assert opened.separate_receipts and opened.receipts_ride
    assert (
        unpack_metadata(Open(UID, SID, 16, separate_receipts=True, receipts_ride=True).to_request().metadata)[
            "receipts"
        ]
        == "next"
    )


def test_requests_decode_to_what_was_encoded_with_the_session_id_padded():
    x = torch.randn(1, 2, 8)
    opened = Open.decode(
        Open(
            UID, SID, max_length=16, client=CLIENT, separate_receipts=True, first_step=Step(SID, 0, hidden=x)
        ).to_request()
    )
    assert opened.session_id == SID.rjust(32, b"\0") and opened.separate_receipts
    assert opened.client.lower() == CLIENT and opened.client != CLIENT  # checksummed
    assert opened.first_step.step == 0 and torch.equal(opened.first_step.hidden, x) and opened.batch_size == 1
    step = decode_inference_request(Step(SID, 1, hidden=x, push_to=PushTarget("h:1", b"t" * 16)).to_request(UID))
    assert isinstance(step, Step) and step.position is None and step.push_to == PushTarget("h:1", b"t" * 16)
    assert isinstance(decode_inference_request(Pay(SID, VOUCHER).to_request()), Pay)
    assert isinstance(decode_inference_request(Flush(SID).to_request()), Flush)
    assert decode_inference_request(Cancel(SID, 2).to_request()).step == 2
    call = ForwardCall.decode(make_request(UID, [x], {"backward": False}))
    assert call.session_id is None and call.step == 0 and call.client == "0x" + "00" * 20 and not call.backward
    assert Push.decode(Push(SID, 4, b"t" * 16, x).to_request()).step == 4


def _error(decode, request) -> NodeRPCError:
    with pytest.raises(NodeRPCError) as error:
        decode(request)
    return error.value


OPEN = {"type": "open", "session_id": SID, "max_length": 8}
STEP = {"type": "step", "session_id": SID, "step": 0}


@pytest.mark.parametrize(
    "metadata, tensors, code, words",
    [
        ({**OPEN, "type": "step"}, 0, ErrorCode.UNKNOWN_SESSION, "no open session"),
        ({**OPEN, "session_id": b""}, 0, ErrorCode.BAD_REQUEST, "session_id"),
        ({**OPEN, "session_id": b"x" * 33}, 0, ErrorCode.BAD_REQUEST, "session_id"),
        ({**OPEN, "session_id": "text"}, 0, ErrorCode.BAD_REQUEST, "session_id"),
        ({**OPEN, "max_length": 0}, 0, ErrorCode.BAD_REQUEST, "max_length"),
        ({**OPEN, "max_length": 8193}, 0, ErrorCode.BAD_REQUEST, "max_length"),
        ({**OPEN, "max_length": True}, 0, ErrorCode.BAD_REQUEST, "max_length"),
        ({k: v for k, v in OPEN.items() if k != "max_length"}, 0, ErrorCode.BAD_REQUEST, "max_length"),
        ({**OPEN, "batch_size": 65}, 0, ErrorCode.BAD_REQUEST, "batch_size"),
        ({**OPEN, "batch_size": 1.0}, 0, ErrorCode.BAD_REQUEST, "batch_size"),
        ({**OPEN, "client": "0x1234"}, 0, ErrorCode.BAD_REQUEST, "client"),
        ({**OPEN, "push_token": b"short"}, 0, ErrorCode.BAD_REQUEST, "push_token"),
        ({**OPEN, "push_token": b"x" * 33}, 0, ErrorCode.BAD_REQUEST, "push_token"),
        ({**OPEN, "step": -1}, 1, ErrorCode.BAD_REQUEST, "step"),  # its first step's fields are checked too
    ],
)
def test_open_decode_errors(metadata, tensors, code, words):
    request = make_request(UID, [torch.randn(1, 1, 8)] * tensors, metadata)
    error = _error(Open.decode, request)
    assert error.code == code and words in error.message


@pytest.mark.parametrize(
    "metadata, tensors, code, words",
    [
        ({**STEP, "type": "open"}, 1, ErrorCode.UNKNOWN_SESSION, "another"),
        ({**STEP, "type": None}, 1, ErrorCode.UNKNOWN_SESSION, "another"),
        ({**STEP, "session_id": None}, 1, ErrorCode.BAD_REQUEST, "session_id"),
        ({**STEP, "step": 2**63}, 1, ErrorCode.BAD_REQUEST, "step"),
        ({**STEP, "step": "1"}, 1, ErrorCode.BAD_REQUEST, "step"),
        ({k: v for k, v in STEP.items() if k != "step"}, 1, ErrorCode.BAD_REQUEST, "step"),
        ({**STEP, "position": -1}, 1, ErrorCode.BAD_REQUEST, "position"),
        ({**STEP, "position": False}, 1, ErrorCode.BAD_REQUEST, "position"),
        ({**STEP, "push_to": {"address": "nohost", "token": b"t"}}, 1, ErrorCode.BAD_REQUEST, "push_to.address"),
        ({**STEP, "push_to": "127.0.0.1:1"}, 1, ErrorCode.BAD_REQUEST, "push_to.address"),
        ({**STEP, "push_to": {"address": "h:1", "token": "t"}}, 1, ErrorCode.BAD_REQUEST, "push_to.token"),
        (STEP, 0, ErrorCode.BAD_REQUEST, "hidden_states"),
        (STEP, 3, ErrorCode.BAD_REQUEST, "hidden_states"),
        ({"type": "pay", "session_id": 5}, 0, ErrorCode.BAD_REQUEST, "session_id"),
        ({"type": "flush"}, 0, ErrorCode.BAD_REQUEST, "session_id"),
        ({"type": "cancel", "session_id": b"x" * 40, "step": 1}, 0, ErrorCode.BAD_REQUEST, "session_id"),
    ],
)
def test_stream_request_decode_errors(metadata, tensors, code, words):
    request = make_request(UID, [torch.randn(1, 1, 8)] * tensors, metadata)
    error = _error(decode_inference_request, request)
    assert error.code == code and words in error.message


def test_call_and_push_decode_errors():
    x = torch.randn(1, 2, 8)
    cases = [
        (ForwardCall.decode, make_request(UID, [], {}), ErrorCode.BAD_REQUEST, "hidden_states"),
        (ForwardCall.decode, make_request(UID, [x, x, x], {}), ErrorCode.BAD_REQUEST, "hidden_states"),
        (ForwardCall.decode, make_request(UID, [x], {"session_id": None}), ErrorCode.BAD_REQUEST, "session_id"),
        (ForwardCall.decode, make_request(UID, [x], {"step": -3}), ErrorCode.BAD_REQUEST, "step"),
        (ForwardCall.decode, make_request(UID, [x], {"client": 7}), ErrorCode.BAD_REQUEST, "client"),
        (BackwardCall.decode, make_request(UID, [x], {}), ErrorCode.BAD_REQUEST, "grad_outputs"),
        (AuditCall.decode, make_request(UID, [], {"session_id": SID}), ErrorCode.BAD_REQUEST, "step"),
        (AuditCall.decode, make_request(UID, [], {"step": 1}), ErrorCode.BAD_REQUEST, "session_id"),
        (Push.decode, make_request("", [x], {"session_id": SID, "step": 0}), ErrorCode.BAD_REQUEST, "token"),
        (Push.decode, make_request("", [x], {"session_id": SID, "token": b"t"}), ErrorCode.BAD_REQUEST, "step"),
        (
            Push.decode,
            make_request("", [x, x], {"session_id": SID, "step": 0, "token": b"t"}),
            ErrorCode.BAD_REQUEST,
            "1 hidden_states",
        ),
        (Open.decode, runtime_pb2.ExpertRequest(uid=UID, metadata=b"\xc1\xc1"), ErrorCode.BAD_REQUEST, "msgpack"),
        (Open.decode, runtime_pb2.ExpertRequest(uid=UID, metadata=pack_metadata([1])), ErrorCode.BAD_REQUEST, "map"),
        (
            Open.decode,
            runtime_pb2.ExpertRequest(uid=UID, metadata=b"\x00" * (MAX_METADATA_BYTES + 1)),
            ErrorCode.TOO_LARGE,
            "metadata",
        ),
        (
            ForwardCall.decode,
            runtime_pb2.ExpertRequest(uid=UID, tensors=[runtime_pb2.Tensor(buffer=b"123", size=[2], dtype="float32")]),
            ErrorCode.BAD_REQUEST,
            "tensor",
        ),
    ]
    for decode, request, code, words in cases:
        error = _error(decode, request)
        assert error.code == code and words in error.message, (decode, error)


def test_audit_reply_carries_the_step_output_beside_inputs_and_prompts():
    x, out, prompts = torch.randn(1, 5, 8), torch.randn(1, 2, 8).to(torch.bfloat16), torch.randn(2, 1, 3, 8)
    back = AuditReply.decode(AuditReply(x, 0, 2, prompts, out).to_response())
    assert torch.equal(back.inputs, x) and torch.equal(back.outputs, out) and torch.equal(back.prompts, prompts)
    assert back.outputs.dtype == torch.bfloat16  # revealed exactly as sent: its hash is the output commitment
    back = AuditReply.decode(AuditReply(x, 0, 2, prompts).to_response())
    assert back.outputs is None and torch.equal(back.prompts, prompts)
    with pytest.raises(ValueError, match="1 to 3 tensors"):
        AuditReply.decode(make_response([], {"start": 0, "end": 2, "outputs": True}))
