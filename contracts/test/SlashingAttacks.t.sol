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
        vm.warp(block.timestamp + UNBOND_DELAY - 1);
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.warp(block.timestamp + 1); // unbonding matured, dispute window still open

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
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.expectRevert(NodeRegistry.UnbondFrozen.selector);
        vm.prank(node);
        registry.requestUnbond(1);
        vm.prank(owner);
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
        new Slashing(
            registry,
            settlement,
            owner,
            1,
            Slashing.Params({
                doubleSignSlashBps: DOUBLE_SIGN_BPS,
                reporterRewardBps: REPORTER_BPS,
                spotCheckSlashBps: SPOT_CHECK_BPS,
                disputeWindow: DISPUTE_WINDOW,
                maxEvidenceAge: UNBOND_DELAY - DISPUTE_WINDOW - 1 hours
            })
        );
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
        new Slashing(
            registry,
            settlement,
            owner,
            1,
            Slashing.Params({
                doubleSignSlashBps: DOUBLE_SIGN_BPS,
                reporterRewardBps: REPORTER_BPS,
                spotCheckSlashBps: SPOT_CHECK_BPS,
                disputeWindow: type(uint64).max,
                maxEvidenceAge: MAX_EVIDENCE_AGE
            })
        );
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

    /// Two cases against one node both freeze its unbonding until the last one closes.
    function test_TwoOpenCasesFreezeUntilBothClose() public {
        vm.startPrank(verifier);
        bytes32 first = slashing.attestSpotCheckFailure(node, "rerun-1");
        bytes32 second = slashing.attestSpotCheckFailure(node, "rerun-2");
        vm.stopPrank();
        assertEq(slashing.openCases(node), 2, "two open");
        vm.prank(owner);
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
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.prank(owner);
        slashing.setVerifier(verifier, false);
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
    }

    /// Before the fix: a threshold raised after a case became ready did not reach that case.
    function test_Attack_RaisedThresholdIgnored() public {
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.startPrank(owner);
        slashing.setVerifier(verifier2, true);
        slashing.setThreshold(2);
        vm.stopPrank();
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);

        vm.prank(verifier2);
        slashing.attestSpotCheckFailure(node, "rerun");
        assertGt(slashing.finalizeSlash(id), 0, "slashed once two active verifiers attest");
        assertEq(slashing.openCases(node), 0, "case closed");
    }
}
