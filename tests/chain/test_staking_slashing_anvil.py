"""Node registry, epoch roots and slashing on a real Anvil: stake and unbond, Merkle inclusion proofs against the
committed root (epochs in order, correctable within the challenge period), double-sign proofs and k-of-n spot-check
slashes on a node-signed receipt proven in a final root, after the dispute window."""

from __future__ import annotations

import pytest
from eth_account import Account

from nectar.chain import ChainError
from nectar.wire.merkle import merkle_proof, merkle_root
from nectar.wire.receipts import keccak256
from tests.chain.signing import sign_receipt

ETHER = 10**18


def _receipt(
    node: str, client: str, *, step: int, output: bytes, session: bytes = b"\x11" * 32, timestamp: int | None = None
) -> dict:
    return {
        "sessionId": session,
        "step": step,
        "kind": 0,
        "modelId": b"\x22" * 32,
        "blockStart": 0,
        "blockEnd": 4,
        "node": node,
        "client": client,
        "tokens": 3,
        "price": 10**12,
        "amount": 3 * 10**12,
        "inputCommitment": b"\x33" * 32,
        "outputCommitment": output,
        "fingerprint": b"\x44" * 32,
        "timestamp": 1_700_000_000 + step if timestamp is None else timestamp,
    }


def _now(chain) -> int:
    return chain.w3.eth.get_block("latest")["timestamp"]


def _commit(chain, roles, receipts: list[dict]) -> tuple[int, list[bytes]]:
    """Commits the next epoch over ``receipts`` as the ledger; returns its number and the leaves."""
    leaves = [chain.receipt_leaf(r) for r in receipts]
    epoch = chain.latest_epoch() + 1
    chain.commit_epoch_root(roles["ledger"][0]["privateKey"], epoch, merkle_root(leaves), len(leaves))
    return epoch, leaves


def _failed_receipt(chain, roles, node: dict, tag: bytes) -> dict:
    """A receipt signed by ``node``, alone in a freshly committed epoch whose challenge period has passed: everything
    a verifier needs to attest it (``epoch``, ``receipt``, ``signature``, ``proof``, ``record_hash``)."""
    receipt = _receipt(
        node["address"], roles["client"][0]["address"], step=1, output=keccak256(tag), session=keccak256(b"s" + tag)
    )
    epoch, leaves = _commit(chain, roles, [receipt])
    chain.advance_time(chain.challenge_period())
    return {
        "epoch": epoch,
        "receipt": receipt,
        "signature": sign_receipt(chain.eip712_domain(), node["privateKey"], receipt),
        "proof": merkle_proof(leaves, 0),
        "record_hash": keccak256(b"re-execution record " + tag),
    }


def test_register_stake_and_unbond(chain, roles):
    node = roles["node"][0]
    stake = 500 * ETHER
    result = chain.register_node(node["privateKey"], "12D3KooWNodeZero", stake)
    assert result.events_named("NodeRegistered")[0]["args"]["peerId"] == "12D3KooWNodeZero"
    assert chain.stake_of(node["address"]) == stake
    assert chain.node_info(node["address"])["registered"]
    with pytest.raises(ChainError, match=r"^AlreadyRegistered"):
        chain.register_node(node["privateKey"], "again", stake)

    chain.request_unbond(node["privateKey"], 100 * ETHER)
    assert chain.stake_of(node["address"]) == 400 * ETHER
    with pytest.raises(ChainError, match=r"^UnbondLocked"):
        chain.unbond(node["privateKey"])
    chain.advance_time(chain.deployment.params["unbond_delay"])
    before = chain.credit_balance(node["address"])
    chain.unbond(node["privateKey"])
    assert chain.credit_balance(node["address"]) == before + 100 * ETHER
    assert [n["node"] for n in chain.registered_nodes()] == [node["address"]]


def test_register_below_minimum_stake_is_rejected(chain, roles):
    node = roles["node"][2]
    with pytest.raises(ChainError, match=r"^StakeBelowMinimum"):
        chain.register_node(node["privateKey"], "12D3KooWSmall", 1)


def test_epoch_root_proves_every_receipt(chain, roles):
    node, client = roles["node"][1]["address"], roles["client"][0]["address"]
    receipts = [_receipt(node, client, step=i, output=bytes([i]) * 32) for i in range(7)]  # odd count: promotion
    leaves = [chain.receipt_leaf(r) for r in receipts]
    root = merkle_root(leaves)
    ledger = roles["ledger"][0]["privateKey"]
    # issue 20: epochs go in order, so nobody can squat a far epoch number; an empty epoch is committed as (0, 0)
    with pytest.raises(ChainError, match=r"^EpochOutOfOrder"):
        chain.commit_epoch_root(ledger, 5, root, len(leaves))
    assert chain.latest_epoch() == 0
    chain.commit_epoch_root(ledger, 1, bytes(32), 0)
    assert chain.epoch_info(1)["committedAt"] > 0 and chain.epoch_root(1) == bytes(32)
    chain.commit_epoch_root(ledger, 2, root, len(leaves))
    assert chain.epoch_root(2) == root and chain.latest_epoch() == 2
    assert chain.epoch_root(3) == bytes(32) and chain.epoch_info(3)["finalAt"] == 0
    for i, receipt in enumerate(receipts):
        assert chain.verify_inclusion(2, receipt, merkle_proof(leaves, i))
    assert not chain.verify_inclusion(2, b"\x99" * 32, merkle_proof(leaves, 0))
    assert not chain.verify_inclusion(3, receipts[0], merkle_proof(leaves, 0))
    # issue 20: an inner node with the rest of a proof is not a leaf (the contract hashes what it is given)
    assert not chain.verify_inclusion(2, merkle_proof(leaves, 0)[0], [])
    inner = keccak256(b"".join(sorted((leaves[0], merkle_proof(leaves, 0)[0]))))
    assert not chain.verify_inclusion(2, inner, merkle_proof(leaves, 0)[1:])
    assert keccak256(chain.receipt_hash(receipts[0])) == leaves[0]
    with pytest.raises(ChainError, match=r"^EpochAlreadyCommitted"):
        chain.commit_epoch_root(ledger, 2, root, len(leaves))
    with pytest.raises(ChainError, match=r"^NotRootCommitter"):
        chain.commit_epoch_root(roles["client"][0]["privateKey"], 3, root, 1)

    # a wrong root is corrected within the challenge period; after it, the root is final
    short = merkle_root(leaves[:3])
    chain.commit_epoch_root(ledger, 3, short, 3)
    chain.correct_epoch_root(ledger, 3, root, len(leaves))
    assert chain.epoch_root(3) == root
    chain.advance_time(chain.challenge_period())
    with pytest.raises(ChainError, match=r"^EpochRootFinal"):
        chain.correct_epoch_root(ledger, 3, short, 3)


def test_double_sign_is_slashed_with_a_reporter_reward(chain, roles):
    node = roles["node"][1]
    chain.register_node(node["privateKey"], "12D3KooWNodeOne", 1_000 * ETHER)
    reporter = roles["client"][1]
    domain = chain.eip712_domain()
    now = _now(chain)  # double-sign evidence is refused once older than max_evidence_age
    a = _receipt(node["address"], reporter["address"], step=42, output=b"\xaa" * 32, timestamp=now)
    b = _receipt(node["address"], reporter["address"], step=42, output=b"\xbb" * 32, timestamp=now)
    sig_a, sig_b = sign_receipt(domain, node["privateKey"], a), sign_receipt(domain, node["privateKey"], b)

    params = chain.deployment.params
    slashed = 1_000 * ETHER * params["double_sign_slash_bps"] // 10_000
    reward = slashed * params["reporter_reward_bps"] // 10_000
    before = chain.credit_balance(reporter["address"])
    result = chain.slash_double_sign(reporter["privateKey"], a, sig_a, b, sig_b)
    assert result.events_named("DoubleSignSlashed")[0]["args"]["amount"] == slashed
    assert chain.stake_of(node["address"]) == 1_000 * ETHER - slashed
    assert chain.credit_balance(reporter["address"]) == before + reward

    with pytest.raises(ChainError, match=r"^EvidenceAlreadyUsed"):
        chain.slash_double_sign(reporter["privateKey"], a, sig_a, b, sig_b)
    framed = sign_receipt(domain, Account.create().key.hex(), {**b, "step": 43})
    with pytest.raises(ChainError, match=r"^InvalidReceiptSignature"):
        chain.slash_double_sign(
            reporter["privateKey"],
            {**a, "step": 43},
            sign_receipt(domain, node["privateKey"], {**a, "step": 43}),
            {**b, "step": 43},
            framed,
        )
    with pytest.raises(ChainError, match=r"^ReceiptsDoNotConflict"):
        chain.slash_double_sign(reporter["privateKey"], a, sig_a, a, sig_a)


def test_spot_check_slash_after_dispute_window(chain, roles):
    node = roles["node"][2]
    chain.register_node(node["privateKey"], "12D3KooWNodeTwo", 1_000 * ETHER)
    verifier = roles["verifier"][0]["privateKey"]
    case = _failed_receipt(chain, roles, node, b"two")
    with pytest.raises(ChainError, match=r"^NotVerifier"):
        chain.attest_spot_check_failure(roles["client"][0]["privateKey"], **case)
    # issue 20: a receipt the node never signed, or one outside the cited root, opens nothing
    forged = {
        **case,
        "signature": sign_receipt(chain.eip712_domain(), roles["client"][0]["privateKey"], case["receipt"]),
    }
    with pytest.raises(ChainError, match=r"^InvalidReceiptSignature"):
        chain.attest_spot_check_failure(verifier, **forged)
    with pytest.raises(ChainError, match=r"^ReceiptNotInEpoch"):
        chain.attest_spot_check_failure(verifier, **{**case, "epoch": case["epoch"] - 1})

    result = chain.attest_spot_check_failure(verifier, **case)
    assert result.events_named("SpotCheckCaseReady")  # k = 1 on the devnet
    case_id = chain.spot_check_case_id(case["receipt"])
    info = chain.spot_check_case(case_id)
    assert info["attestations"] == 1 and not info["closed"] and info["epoch"] == case["epoch"]
    assert info["recordHash"] == case["record_hash"] and info["node"] == node["address"]
    assert chain.node_case_in_epoch(node["address"], case["epoch"]) == case_id
    with pytest.raises(ChainError, match=r"^DisputeWindowOpen"):
        chain.finalize_slash(verifier, case_id)

    chain.advance_time(chain.deployment.params["dispute_window"])
    treasury = chain.registry.functions.treasury().call()
    before = chain.credit_balance(treasury)
    chain.finalize_slash(roles["client"][0]["privateKey"], case_id)  # anyone may finalize
    slashed = 1_000 * ETHER * chain.deployment.params["spot_check_slash_bps"] // 10_000
    assert chain.stake_of(node["address"]) == 1_000 * ETHER - slashed
    assert chain.credit_balance(treasury) == before + slashed
    with pytest.raises(ChainError, match=r"^CaseClosed"):
        chain.finalize_slash(verifier, case_id)


def test_k_of_n_verifiers_and_dismissal(chain, roles):
    manager, verifier = roles["deployer"][0]["privateKey"], roles["verifier"][0]["privateKey"]
    arbiter = roles["arbiter"][0]["privateKey"]
    assert chain.slashing_roles() == {
        "arbiter": roles["arbiter"][0]["address"],
        "verifierManager": roles["deployer"][0]["address"],
    }
    second = roles["treasury"][0]  # any funded account can be made a verifier
    node = roles["node"][1]
    with pytest.raises(ChainError, match=r"^NotVerifierManager"):
        chain.set_verifier(arbiter, second["address"])  # issue 20: the arbiter cannot pick verifiers
    chain.set_verifier(manager, second["address"])
    chain.set_verifier_threshold(manager, 2)
    try:
        case = _failed_receipt(chain, roles, node, b"second opinion")
        chain.attest_spot_check_failure(verifier, **case)
        case_id = chain.spot_check_case_id(case["receipt"])
        assert chain.spot_check_case(case_id)["readyAt"] == 0  # 1 of 2
        with pytest.raises(ChainError, match=r"^CaseNotReady"):
            chain.finalize_slash(verifier, case_id)
        with pytest.raises(ChainError, match=r"^AlreadyAttested"):
            chain.attest_spot_check_failure(verifier, **case)
        chain.attest_spot_check_failure(second["privateKey"], **case)
        assert chain.spot_check_case(case_id)["readyAt"] > 0  # 2 of 2: the dispute window runs

        stake = chain.stake_of(node["address"])
        with pytest.raises(ChainError, match=r"^NotArbiter"):
            chain.dismiss_case(manager, case_id)  # issue 20: the verifier manager cannot dismiss
        chain.dismiss_case(arbiter, case_id)  # the arbiter sides with the node
        chain.advance_time(chain.deployment.params["dispute_window"])
        with pytest.raises(ChainError, match=r"^CaseClosed"):
            chain.finalize_slash(verifier, case_id)
        assert chain.stake_of(node["address"]) == stake
    finally:
        chain.set_verifier_threshold(manager, 1)
        chain.set_verifier(manager, second["address"], False)


def test_framing_with_two_inputs_is_not_a_double_sign(chain, roles):
    """Issue 20: a client that sends two inputs under one (session, step) gets two honest receipts; before the fix
    they slashed the node. Stale evidence is refused too, and a self-report earns no reward."""
    node, attacker = roles["node"][1], roles["client"][2]  # registered by the double-sign test above
    stake = chain.stake_of(node["address"])
    domain = chain.eip712_domain()
    now = _now(chain)
    a = _receipt(node["address"], attacker["address"], step=7, output=b"\xaa" * 32, timestamp=now)
    b = {**a, "inputCommitment": b"\x55" * 32, "outputCommitment": b"\xbb" * 32}
    sig_a, sig_b = sign_receipt(domain, node["privateKey"], a), sign_receipt(domain, node["privateKey"], b)
    with pytest.raises(ChainError, match=r"^ReceiptsDoNotConflict"):
        chain.slash_double_sign(attacker["privateKey"], a, sig_a, b, sig_b)
    assert chain.stake_of(node["address"]) == stake

    old = {**a, "timestamp": now - chain.deployment.params["max_evidence_age"] - 10}
    old_b = {**old, "outputCommitment": b"\xbb" * 32}
    with pytest.raises(ChainError, match=r"^EvidenceTooOld"):
        chain.slash_double_sign(
            attacker["privateKey"],
            old,
            sign_receipt(domain, node["privateKey"], old),
            old_b,
            sign_receipt(domain, node["privateKey"], old_b),
        )

    b = {**a, "outputCommitment": b"\xbb" * 32}  # a real equivocation, reported by the node itself
    before = chain.credit_balance(node["address"])
    chain.slash_double_sign(node["privateKey"], a, sig_a, b, sign_receipt(domain, node["privateKey"], b))
    assert chain.stake_of(node["address"]) == stake - stake * chain.deployment.params["double_sign_slash_bps"] // 10_000
    assert chain.credit_balance(node["address"]) == before  # no reporter reward to the node


def test_open_case_freezes_unbonding(chain, roles):
    """Issue 20: before the fix a node unbonded inside the dispute window of an open case."""
    node = roles["node"][0]  # registered by the first test
    verifier = roles["verifier"][0]["privateKey"]
    stake = chain.stake_of(node["address"])
    case = _failed_receipt(chain, roles, node, b"frozen while judged")
    chain.attest_spot_check_failure(verifier, **case)
    with pytest.raises(ChainError, match=r"^UnbondFrozen"):
        chain.request_unbond(node["privateKey"], 100 * ETHER)
    chain.advance_time(chain.deployment.params["dispute_window"])
    chain.finalize_slash(verifier, chain.spot_check_case_id(case["receipt"]))
    slashed = stake * chain.deployment.params["spot_check_slash_bps"] // 10_000
    chain.request_unbond(node["privateKey"], 100 * ETHER)  # the case is closed: unbonding is free again
    assert chain.stake_of(node["address"]) == stake - slashed - 100 * ETHER
