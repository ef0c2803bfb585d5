"""Node registry, epoch roots and slashing on a real Anvil: stake and unbond, Merkle inclusion proofs against the
committed root, double-sign proofs and k-of-n spot-check slashes after the dispute window."""

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
    chain.commit_epoch_root(ledger, 5, root, len(leaves))
    assert chain.epoch_root(5) == root
    assert chain.epoch_root(6) == bytes(32)
    for i, receipt in enumerate(receipts):
        assert chain.verify_inclusion(5, receipt, merkle_proof(leaves, i))
    assert not chain.verify_inclusion(5, b"\x99" * 32, merkle_proof(leaves, 0))
    assert not chain.verify_inclusion(6, receipts[0], merkle_proof(leaves, 0))
    # issue 20: an inner node with the rest of a proof is not a leaf (the contract hashes what it is given)
    assert not chain.verify_inclusion(5, merkle_proof(leaves, 0)[0], [])
    inner = keccak256(b"".join(sorted((leaves[0], merkle_proof(leaves, 0)[0]))))
    assert not chain.verify_inclusion(5, inner, merkle_proof(leaves, 0)[1:])
    assert keccak256(chain.receipt_hash(receipts[0])) == leaves[0]
    with pytest.raises(ChainError, match=r"^EpochAlreadyCommitted"):
        chain.commit_epoch_root(ledger, 5, root, len(leaves))
    with pytest.raises(ChainError, match=r"^NotRootCommitter"):
        chain.commit_epoch_root(roles["client"][0]["privateKey"], 9, root, 1)


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
    evidence = b"re-ran span 0-4 of session 11..: fingerprint mismatch"
    with pytest.raises(ChainError, match=r"^NotVerifier"):
        chain.attest_spot_check_failure(roles["client"][0]["privateKey"], node["address"], evidence)

    result = chain.attest_spot_check_failure(verifier, node["address"], evidence)
    assert result.events_named("SpotCheckCaseReady")  # k = 1 on the devnet
    case = chain.spot_check_case(chain.spot_check_case_id(node["address"], evidence))
    assert case["attestations"] == 1 and not case["closed"]
    with pytest.raises(ChainError, match=r"^DisputeWindowOpen"):
        chain.finalize_slash(verifier, node["address"], evidence)

    chain.advance_time(chain.deployment.params["dispute_window"])
    treasury = chain.registry.functions.treasury().call()
    before = chain.credit_balance(treasury)
    chain.finalize_slash(roles["client"][0]["privateKey"], node["address"], evidence)  # anyone may finalize
    slashed = 1_000 * ETHER * chain.deployment.params["spot_check_slash_bps"] // 10_000
    assert chain.stake_of(node["address"]) == 1_000 * ETHER - slashed
    assert chain.credit_balance(treasury) == before + slashed
    with pytest.raises(ChainError, match=r"^CaseClosed"):
        chain.finalize_slash(verifier, node["address"], evidence)


def test_k_of_n_verifiers_and_dismissal(chain, roles):
    owner, verifier = roles["deployer"][0]["privateKey"], roles["verifier"][0]["privateKey"]
    second = roles["treasury"][0]  # any funded account can be made a verifier
    node = roles["node"][1]["address"]
    chain.set_verifier(owner, second["address"])
    chain.set_verifier_threshold(owner, 2)
    try:
        evidence = b"second opinion needed"
        chain.attest_spot_check_failure(verifier, node, evidence)
        case_id = chain.spot_check_case_id(node, evidence)
        assert chain.spot_check_case(case_id)["readyAt"] == 0  # 1 of 2
        with pytest.raises(ChainError, match=r"^CaseNotReady"):
            chain.finalize_slash(verifier, case_id=case_id)
        with pytest.raises(ChainError, match=r"^AlreadyAttested"):
            chain.attest_spot_check_failure(verifier, node, evidence)
        chain.attest_spot_check_failure(second["privateKey"], node, evidence)
        assert chain.spot_check_case(case_id)["readyAt"] > 0  # 2 of 2: the dispute window runs

        stake = chain.stake_of(node)
        with pytest.raises(ChainError, match=r"^OwnableUnauthorizedAccount"):
            chain.dismiss_case(verifier, case_id)
        chain.dismiss_case(owner, case_id)  # the arbiter sides with the node
        chain.advance_time(chain.deployment.params["dispute_window"])
        with pytest.raises(ChainError, match=r"^CaseClosed"):
            chain.finalize_slash(verifier, case_id=case_id)
        assert chain.stake_of(node) == stake
    finally:
        chain.set_verifier_threshold(owner, 1)
        chain.set_verifier(owner, second["address"], False)


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
    evidence = b"frozen while judged"
    chain.attest_spot_check_failure(verifier, node["address"], evidence)
    with pytest.raises(ChainError, match=r"^UnbondFrozen"):
        chain.request_unbond(node["privateKey"], 100 * ETHER)
    chain.advance_time(chain.deployment.params["dispute_window"])
    chain.finalize_slash(verifier, node["address"], evidence)
    slashed = stake * chain.deployment.params["spot_check_slash_bps"] // 10_000
    chain.request_unbond(node["privateKey"], 100 * ETHER)  # the case is closed: unbonding is free again
    assert chain.stake_of(node["address"]) == stake - slashed - 100 * ETHER
