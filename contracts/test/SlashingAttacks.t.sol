// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {NodeRegistry} from "../src/NodeRegistry.sol";
import {Slashing} from "../src/Slashing.sol";
import {Receipt} from "../src/lib/NectarTypes.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

/// @notice Issue 20 (on-chain soundness), the staking/slashing side: each test is an attack that succeeded against
///         the contracts before the fix (noted per test) and must fail now.
contract SlashingAttacksTest is NectarFixture {
    uint256 internal constant STAKE = 1_000 ether;
    bytes32 internal constant SESSION = keccak256("session");
    address internal attacker = address(0xA77A);
    address internal verifier2 = address(0x7E42);

    function setUp() public override {
        super.setUp();
        _register(node, STAKE);
    }

    function _pair(bytes32 inputA, bytes32 inputB)
        internal
        view
        returns (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB)
    {
        a = _receipt(node, SESSION, 12, keccak256("out-1"));
        b = _receipt(node, SESSION, 12, keccak256("out-2"));
        a.inputCommitment = inputA;
        b.inputCommitment = inputB;
        sigA = _signReceipt(NODE_PK, a);
        sigB = _signReceipt(NODE_PK, b);
    }

    /*//////////////////////////////////////////////////////////////
                  1. FRAMING AN HONEST NODE (CRITICAL)
    //////////////////////////////////////////////////////////////*/

    /// Before the fix: the client sent two inputs under one (session, step), the node honestly answered both, and
    /// the pair slashed half its stake with a tenth of that to the attacker (this call succeeded).
    function test_Attack_ClientFramesNodeWithTwoInputs() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) =
            _pair(keccak256("input-1"), keccak256("input-2"));
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        vm.prank(attacker);
        slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(registry.slashableOf(node), STAKE, "honest node keeps its stake");
        assertEq(credits.balanceOf(attacker), 0, "no reward for framing");
    }

    /// Before the fix: receipts for two clients (or two models) under one session id and step counted as proof.
    function test_Attack_FrameWithDifferentClientOrModel() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _pair(keccak256("input"), keccak256("input"));
        b.client = attacker;
        bytes memory sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);

        b.client = a.client;
        b.modelId = keccak256("other-model");
        sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
    }

    /// A real equivocation (same input, client and model, two outputs) is still slashed.
    function test_SameInputDifferentOutputIsSlashed() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) =
            _pair(keccak256("input"), keccak256("input"));
        vm.prank(attacker);
        uint256 slashed = slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(slashed, STAKE * DOUBLE_SIGN_BPS / 10_000, "half the stake");
        assertEq(credits.balanceOf(attacker), slashed * REPORTER_BPS / 10_000, "reporter reward");
    }

    /*//////////////////////////////////////////////////////////////
                       2. SELF-REPORTING FOR A REWARD
    //////////////////////////////////////////////////////////////*/

    /// Before the fix: the node reported its own double-sign and got `reporterRewardBps` of its own slash back.
    function test_Attack_NodeReportsItselfForReward() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) =
            _pair(keccak256("input"), keccak256("input"));
        uint256 before = credits.balanceOf(node);
        vm.prank(node);
        uint256 slashed = slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(credits.balanceOf(node), before, "no reward to the node itself");
        assertEq(credits.balanceOf(treasury), slashed, "all of it to the treasury");
    }

    /*//////////////////////////////////////////////////////////////
                          3. ESCAPING A SLASH
    //////////////////////////////////////////////////////////////*/

    /// Before the fix: a node whose unbonding matured inside the dispute window took its stake out, and the slash
    /// found nothing (`unbond` succeeded with a case open).
    function test_Attack_UnbondDuringOpenCase() public {
        vm.prank(node);
        registry.requestUnbond(STAKE);
        uint256 matures = block.timestamp + UNBOND_DELAY;
        vm.warp(matures - 1 - CHALLENGE_PERIOD);
        bytes32 id = _openCase(NODE_PK, "bad-output"); // waits out the root's challenge period: now matures - 1
        vm.warp(matures); // unbonding matured, dispute window still open

        vm.expectRevert(NodeRegistry.UnbondFrozen.selector);
        vm.prank(node);
        registry.unbond();

        vm.warp(block.timestamp + DISPUTE_WINDOW);
        uint256 slashed = slashing.finalizeSlash(id);
        assertEq(slashed, STAKE * SPOT_CHECK_BPS / 10_000, "slash reached the unbonding stake");
        vm.prank(node);
        assertEq(registry.unbond(), STAKE - slashed, "the rest leaves once the case is closed");
    }

    /// Before the fix: a node with an open case could start unbonding.
    function test_Attack_RequestUnbondDuringOpenCase() public {
        bytes32 id = _openCase(NODE_PK, "bad-output");
        vm.expectRevert(NodeRegistry.UnbondFrozen.selector);
        vm.prank(node);
        registry.requestUnbond(1);
        vm.prank(arbiter);
        slashing.dismissCase(id);
        vm.prank(node);
        registry.requestUnbond(1); // a dismissed case unfreezes
    }

    /// Before the fix: evidence had no age bound, so receipts from any time slashed (this call succeeded).
    function test_Attack_StaleEvidenceRefused() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) =
            _pair(keccak256("input"), keccak256("input"));
        vm.warp(block.timestamp + MAX_EVIDENCE_AGE + 1);
        vm.expectRevert(abi.encodeWithSelector(Slashing.EvidenceTooOld.selector, a.timestamp));
        slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
    }

    function test_EvidenceAtMaxAgeStillSlashes() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) =
            _pair(keccak256("input"), keccak256("input"));
        vm.warp(block.timestamp + MAX_EVIDENCE_AGE);
        slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(registry.slashableOf(node), STAKE / 2, "slashed");
    }

    /// Before the fix: nothing tied the unbond delay to the dispute window (the constructor accepted any pair).
    function test_RevertWhen_UnbondDelayNotAboveEvidenceAgePlusWindow() public {
        uint256 minimum = (UNBOND_DELAY - DISPUTE_WINDOW - 1 hours) + DISPUTE_WINDOW + 1 hours;
        vm.expectRevert(abi.encodeWithSelector(Slashing.UnbondDelayTooShort.selector, UNBOND_DELAY, minimum));
        Slashing.Params memory p = _slashParams();
        p.maxEvidenceAge = UNBOND_DELAY - DISPUTE_WINDOW - 1 hours;
        new Slashing(registry, settlement, arbiter, manager, 1, p);
    }

    /// Matured unbonding stake is not routing stake (this held before too: stakeOf is bonded only).
    function test_MaturedUnbondingDoesNotCountForRouting() public {
        vm.prank(node);
        registry.requestUnbond(STAKE / 2);
        vm.warp(block.timestamp + UNBOND_DELAY);
        assertEq(registry.stakeOf(node), STAKE / 2, "routing stake excludes unbonding");
        assertEq(registry.slashableOf(node), STAKE, "still slashable");
    }

    /*//////////////////////////////////////////////////////////////
                               4. LESSER
    //////////////////////////////////////////////////////////////*/

    /// Before the fix: a zero treasury was accepted (slashed stake would be sent to address(0) or revert).
    function test_RevertWhen_ZeroTreasury() public {
        vm.expectRevert(NodeRegistry.ZeroTreasury.selector);
        new NodeRegistry(credits, MIN_STAKE, UNBOND_DELAY, address(0), owner);
    }

    /// Before the fix: an unbond delay near 2**64 truncated `unlockAt`, making stake withdrawable at once.
    function test_RevertWhen_UnbondDelayWouldTruncate() public {
        vm.expectRevert(NodeRegistry.BadUnbondDelay.selector);
        new NodeRegistry(credits, MIN_STAKE, type(uint64).max, treasury, owner);
    }

    /// Before the fix: a dispute window near 2**64 truncated `readyAt`.
    function test_RevertWhen_DisputeWindowWouldTruncate() public {
        vm.expectRevert(Slashing.BadParameter.selector);
        Slashing.Params memory p = _slashParams();
        p.disputeWindow = type(uint64).max;
        new Slashing(registry, settlement, arbiter, manager, 1, p);
    }

    /// Before the fix: a node that unbonded (or was slashed) to zero stayed `isRegistered`.
    function test_ZeroStakeIsNotRegistered() public {
        vm.prank(node);
        registry.requestUnbond(STAKE);
        assertFalse(registry.isRegistered(node), "no bonded stake, not registered");
        _mint(node, MIN_STAKE);
        vm.startPrank(node);
        credits.approve(address(registry), MIN_STAKE);
        registry.addStake(MIN_STAKE);
        vm.stopPrank();
        assertTrue(registry.isRegistered(node), "back with stake");
    }

    /*//////////////////////////////////////////////////////////////
                      5. BOUNDED SPOT-CHECK SLASHING
    //////////////////////////////////////////////////////////////*/

    /// Two cases against one node (two epochs) both freeze its unbonding until the last one closes.
    function test_TwoOpenCasesFreezeUntilBothClose() public {
        bytes32 first = _openCase(NODE_PK, "bad-output-1");
        bytes32 second = _openCase(NODE_PK, "bad-output-2");
        assertEq(slashing.openCases(node), 2, "two open");
        vm.prank(arbiter);
        slashing.dismissCase(first);
        vm.expectRevert(NodeRegistry.UnbondFrozen.selector);
        vm.prank(node);
        registry.requestUnbond(1);
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        slashing.finalizeSlash(second);
        assertEq(slashing.openCases(node), 0, "none open");
        vm.prank(node);
        registry.requestUnbond(1);
    }

    /// Before the fix: a case attested by a verifier revoked since still finalized.
    function test_Attack_RevokedVerifierCaseFinalizes() public {
        bytes32 id = _openCase(NODE_PK, "bad-output");
        vm.prank(manager);
        slashing.setVerifier(verifier, false);
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
    }

    /// Before the fix: a threshold raised after a case became ready did not reach that case.
    function test_Attack_RaisedThresholdIgnored() public {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        bytes32 id = _attest(verifier, epoch, r, sig, proof);
        vm.startPrank(manager);
        slashing.setVerifier(verifier2, true);
        slashing.setThreshold(2);
        vm.stopPrank();
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);

        _attest(verifier2, epoch, r, sig, proof);
        assertGt(slashing.finalizeSlash(id), 0, "slashed once two active verifiers attest");
        assertEq(slashing.openCases(node), 0, "case closed");
    }

    /*//////////////////////////////////////////////////////////////
                6. EVIDENCED, BOUNDED SPOT-CHECK CASES
    //////////////////////////////////////////////////////////////*/

    /// Before the fix: `attestSpotCheckFailure(node, anyBytes)` opened a 10% case on opaque, unchecked evidence. Now a
    /// receipt that is not in the cited epoch's root opens nothing.
    function test_Attack_CaseOnReceiptNotInRoot() public {
        (uint64 epoch,,,) = _citable(NODE_PK, "in-the-root");
        Receipt memory other = _receipt(node, SESSION, 99, keccak256("never-committed"));
        bytes memory sig = _signReceipt(NODE_PK, other); // really signed by the node, just never reported
        bytes32[] memory none = new bytes32[](0);
        vm.expectRevert(abi.encodeWithSelector(Slashing.ReceiptNotInEpoch.selector, epoch));
        _attest(verifier, epoch, other, sig, none);
        vm.expectRevert(abi.encodeWithSelector(Slashing.ReceiptNotInEpoch.selector, epoch + 1));
        _attest(verifier, epoch + 1, other, sig, none); // an epoch never committed
        assertEq(slashing.openCases(node), 0, "no case");
    }

    /// Before the fix: a verifier accused a node of any work it liked. Now the receipt must carry the node's own
    /// signature: one the verifier made up (even if it got it into a root) opens nothing.
    function test_Attack_CaseOnReceiptNotSignedByNode() public {
        Receipt memory fake = _receipt(node, SESSION, 5, keccak256("made-up"));
        Receipt[] memory one = new Receipt[](1);
        one[0] = fake;
        (uint64 epoch, bytes32[][] memory proofs) = _commitEpoch(one);
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
        bytes memory forged = _signReceipt(CLIENT_PK, fake);
        vm.expectRevert(Slashing.InvalidReceiptSignature.selector);
        _attest(verifier, epoch, fake, forged, proofs[0]);
        fake.node = address(0);
        vm.expectRevert(Slashing.InvalidReceiptSignature.selector);
        _attest(verifier, epoch, fake, forged, proofs[0]);
        assertEq(slashing.openCases(node), 0, "no case");
    }

    /// Before the fix: one verifier opened any number of 10% cases against one node. Now a node has one case per epoch:
    /// a second failed receipt of the same epoch opens nothing, before or after the first case is slashed.
    function test_Attack_SecondCaseSameNodeSameEpoch() public {
        Receipt[] memory two = new Receipt[](2);
        two[0] = _receipt(node, SESSION, 1, keccak256("bad-1"));
        two[1] = _receipt(node, SESSION, 2, keccak256("bad-2"));
        (uint64 epoch, bytes32[][] memory proofs) = _commitEpoch(two);
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
        bytes32 first = _attest(verifier, epoch, two[0], _signReceipt(NODE_PK, two[0]), proofs[0]);
        bytes memory sig = _signReceipt(NODE_PK, two[1]);
        vm.expectRevert(abi.encodeWithSelector(Slashing.NodeHasCaseInEpoch.selector, node, epoch, first));
        _attest(verifier, epoch, two[1], sig, proofs[1]);

        vm.warp(block.timestamp + DISPUTE_WINDOW);
        slashing.finalizeSlash(first);
        vm.expectRevert(abi.encodeWithSelector(Slashing.NodeHasCaseInEpoch.selector, node, epoch, first));
        _attest(verifier, epoch, two[1], sig, proofs[1]);
        assertEq(registry.slashableOf(node), STAKE - STAKE * SPOT_CHECK_BPS / 10_000, "slashed once for the epoch");
    }

    /// A dismissed case gives its place back: a rogue verifier's bogus case cannot shield a cheater for the epoch, and
    /// the dismissed receipt itself stays closed.
    function test_DismissedCaseFreesTheNodesEpoch() public {
        Receipt[] memory two = new Receipt[](2);
        two[0] = _receipt(node, SESSION, 1, keccak256("fine"));
        two[1] = _receipt(node, SESSION, 2, keccak256("bad"));
        (uint64 epoch, bytes32[][] memory proofs) = _commitEpoch(two);
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
        bytes memory sig0 = _signReceipt(NODE_PK, two[0]);
        bytes32 bogus = _attest(verifier, epoch, two[0], sig0, proofs[0]);
        vm.prank(arbiter);
        slashing.dismissCase(bogus);
        assertEq(slashing.casesInEpoch(epoch), 0, "cap slot back");
        vm.expectRevert(Slashing.CaseClosed.selector);
        _attest(verifier, epoch, two[0], sig0, proofs[0]);
        bytes32 real = _attest(verifier, epoch, two[1], _signReceipt(NODE_PK, two[1]), proofs[1]);
        assertEq(slashing.caseOf(node, epoch), real, "the real case holds the place");
    }

    /// One receipt is one case: a second verifier attesting the same receipt adds to the case, never opens another.
    function test_SameReceiptIsOneCase() public {
        vm.prank(manager);
        slashing.setVerifier(verifier2, true);
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        bytes32 a = _attest(verifier, epoch, r, sig, proof);
        bytes32 b = _attest(verifier2, epoch, r, sig, proof);
        assertEq(a, b, "same case");
        assertEq(slashing.openCases(node), 1, "one open case");
        assertEq(slashing.casesInEpoch(epoch), 1, "one case in the epoch");
    }

    /// Before the fix: nothing bounded the cases opened at once. Now at most `maxCasesPerEpoch` cite one epoch.
    function test_Attack_MoreCasesThanTheEpochCap() public {
        uint256 n = MAX_CASES_PER_EPOCH + 1;
        Receipt[] memory receipts = new Receipt[](n);
        uint256[] memory keys = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            keys[i] = 0x5000 + i;
            _register(vm.addr(keys[i]), STAKE);
            receipts[i] = _receipt(vm.addr(keys[i]), SESSION, uint64(i), keccak256(abi.encode("bad", i)));
        }
        (uint64 epoch, bytes32[][] memory proofs) = _commitEpoch(receipts);
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
        for (uint256 i; i < MAX_CASES_PER_EPOCH; ++i) {
            _attest(verifier, epoch, receipts[i], _signReceipt(keys[i], receipts[i]), proofs[i]);
        }
        bytes memory sig = _signReceipt(keys[n - 1], receipts[n - 1]);
        vm.expectRevert(abi.encodeWithSelector(Slashing.EpochCaseCapReached.selector, epoch));
        _attest(verifier, epoch, receipts[n - 1], sig, proofs[n - 1]);
        assertEq(slashing.casesInEpoch(epoch), MAX_CASES_PER_EPOCH, "capped");
        assertFalse(slashing.hasOpenCase(vm.addr(keys[n - 1])), "the last node is not frozen");
    }

    /// A case may only cite a final root: inside the challenge period the committer could still swap it.
    function test_RevertWhen_CaseCitesRootInChallengePeriod() public {
        Receipt memory r = _receipt(node, SESSION, 1, keccak256("bad"));
        Receipt[] memory one = new Receipt[](1);
        one[0] = r;
        (uint64 epoch, bytes32[][] memory proofs) = _commitEpoch(one);
        bytes memory sig = _signReceipt(NODE_PK, r);
        uint256 finalAt = block.timestamp + CHALLENGE_PERIOD;
        vm.warp(finalAt - 1);
        vm.expectRevert(abi.encodeWithSelector(Slashing.EpochRootNotFinal.selector, epoch, finalAt));
        _attest(verifier, epoch, r, sig, proofs[0]);
        vm.warp(finalAt);
        _attest(verifier, epoch, r, sig, proofs[0]);
    }

    /// A root older than `maxEvidenceAge` backs no new case: a node is not liable forever, and a rogue verifier cannot
    /// walk back through every epoch ever committed.
    function test_RevertWhen_CaseCitesStaleEpoch() public {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        (,, uint64 committedAt) = settlement.epochRoot(epoch);
        vm.warp(uint256(committedAt) + MAX_EVIDENCE_AGE + 1);
        vm.expectRevert(abi.encodeWithSelector(Slashing.EpochTooOld.selector, epoch, committedAt));
        _attest(verifier, epoch, r, sig, proof);
    }

    /// Before the fix: the owner was both arbiter and verifier manager. Now the arbiter cannot add verifiers (so it
    /// cannot open cases through a verifier of its own) and the manager cannot dismiss cases.
    function test_Attack_ArbiterManagesVerifiers() public {
        vm.expectRevert(Slashing.NotVerifierManager.selector);
        vm.prank(arbiter);
        slashing.setVerifier(arbiter, true);
        vm.expectRevert(Slashing.NotVerifierManager.selector);
        vm.prank(arbiter);
        slashing.setThreshold(1);
        assertFalse(slashing.isVerifier(arbiter), "arbiter is no verifier");

        bytes32 id = _openCase(NODE_PK, "bad-output");
        vm.expectRevert(Slashing.NotArbiter.selector);
        vm.prank(manager);
        slashing.dismissCase(id);
        vm.prank(arbiter);
        slashing.dismissCase(id);
    }
}
