// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Slashing} from "../src/Slashing.sol";
import {Receipt} from "../src/lib/NectarTypes.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

contract SlashingTest is NectarFixture {
    event DoubleSignSlashed(
        address indexed node, address indexed reporter, bytes32 sessionId, uint64 step, uint256 amount, uint256 reward
    );
    event SpotCheckCaseReady(bytes32 indexed caseId, address indexed node, uint256 readyAt);
    event SpotCheckSlashed(bytes32 indexed caseId, address indexed node, uint256 amount);

    uint256 internal constant STAKE = 1_000 ether;
    bytes32 internal constant SESSION = keccak256("session");
    address internal reporter = address(0x4E90);

    function setUp() public override {
        super.setUp();
        _register(node, STAKE);
    }

    /*//////////////////////////////////////////////////////////////
                               DOUBLE SIGN
    //////////////////////////////////////////////////////////////*/

    function _conflict()
        internal
        view
        returns (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB)
    {
        a = _receipt(node, SESSION, 12, keccak256("out-1"));
        b = _receipt(node, SESSION, 12, keccak256("out-2"));
        sigA = _signReceipt(NODE_PK, a);
        sigB = _signReceipt(NODE_PK, b);
    }

    function test_SlashDoubleSign() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) = _conflict();
        uint256 amount = STAKE * DOUBLE_SIGN_BPS / 10_000;
        uint256 reward = amount * REPORTER_BPS / 10_000;
        vm.expectEmit(address(slashing));
        emit DoubleSignSlashed(node, reporter, SESSION, 12, amount, reward);
        vm.prank(reporter);
        slashing.slashDoubleSign(a, sigA, b, sigB);
        assertEq(registry.slashableOf(node), STAKE - amount, "stake cut");
        assertEq(credits.balanceOf(reporter), reward, "reporter paid");
        assertEq(credits.balanceOf(treasury), amount - reward, "treasury paid");
    }

    function test_RevertWhen_SameEvidenceTwice() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b, bytes memory sigB) = _conflict();
        slashing.slashDoubleSign(a, sigA, b, sigB);
        vm.expectRevert(Slashing.EvidenceAlreadyUsed.selector);
        slashing.slashDoubleSign(b, sigB, a, sigA);
    }

    function test_RevertWhen_SameOutput() public {
        (Receipt memory a, bytes memory sigA,,) = _conflict();
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, a, sigA);
    }

    function test_RevertWhen_DifferentStep() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        b.step = 13;
        bytes memory sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
    }

    function test_RevertWhen_DifferentSession() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        b.sessionId = keccak256("other");
        bytes memory sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
    }

    function test_RevertWhen_DifferentKind() public {
        // a forward and a backward pass at the same step legitimately differ
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        b.kind = 2;
        bytes memory sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
    }

    function test_RevertWhen_DifferentSpan() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        b.blockStart = 4;
        b.blockEnd = 8;
        bytes memory sigB = _signReceipt(NODE_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
    }

    function test_RevertWhen_DifferentNodes() public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        b.node = node2;
        bytes memory sigB = _signReceipt(NODE2_PK, b);
        vm.expectRevert(Slashing.ReceiptsDoNotConflict.selector);
        slashing.slashDoubleSign(a, sigA, b, sigB);
    }

    function test_RevertWhen_ReceiptForgedByReporter() public {
        // A reporter cannot frame a node: the second receipt is signed by someone else.
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        bytes memory forged = _signReceipt(CLIENT_PK, b);
        vm.expectRevert(Slashing.InvalidReceiptSignature.selector);
        slashing.slashDoubleSign(a, sigA, b, forged);
    }

    function testFuzz_RevertWhen_GarbageSignature(bytes memory garbage) public {
        (Receipt memory a, bytes memory sigA, Receipt memory b,) = _conflict();
        vm.expectRevert(Slashing.InvalidReceiptSignature.selector);
        slashing.slashDoubleSign(a, sigA, b, garbage);
    }

    /*//////////////////////////////////////////////////////////////
                               SPOT CHECKS
    //////////////////////////////////////////////////////////////*/

    function test_SpotCheckSlashAfterDisputeWindow() public {
        vm.expectEmit(address(slashing));
        emit SpotCheckCaseReady(slashing.caseId(node, "rerun"), node, block.timestamp + DISPUTE_WINDOW);
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        assertEq(id, slashing.caseId(node, "rerun"), "case id");

        vm.expectRevert(abi.encodeWithSelector(Slashing.DisputeWindowOpen.selector, block.timestamp + DISPUTE_WINDOW));
        slashing.finalizeSlash(id);

        vm.warp(block.timestamp + DISPUTE_WINDOW);
        uint256 amount = STAKE * SPOT_CHECK_BPS / 10_000;
        vm.expectEmit(address(slashing));
        emit SpotCheckSlashed(id, node, amount);
        slashing.finalizeSlash(id);
        assertEq(registry.slashableOf(node), STAKE - amount, "stake cut");
        assertEq(credits.balanceOf(treasury), amount, "to treasury");

        vm.expectRevert(Slashing.CaseClosed.selector);
        slashing.finalizeSlash(id);
        vm.expectRevert(Slashing.CaseClosed.selector);
        vm.prank(verifier);
        slashing.attestSpotCheckFailure(node, "rerun");
    }

    function test_KOfNThreshold() public {
        address verifier2 = address(0x7E42);
        address verifier3 = address(0x7E43);
        vm.startPrank(owner);
        slashing.setVerifier(verifier2, true);
        slashing.setVerifier(verifier3, true);
        slashing.setThreshold(2);
        vm.stopPrank();

        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        (, uint256 attestations, uint256 readyAt,) = slashing.caseInfo(id);
        assertEq(attestations, 1, "one attestation");
        assertEq(readyAt, 0, "not ready at 1 of 2");
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);

        vm.expectRevert(Slashing.AlreadyAttested.selector);
        vm.prank(verifier);
        slashing.attestSpotCheckFailure(node, "rerun");

        vm.prank(verifier3);
        slashing.attestSpotCheckFailure(node, "rerun");
        (, attestations, readyAt,) = slashing.caseInfo(id);
        assertEq(attestations, 2, "two attestations");
        assertEq(readyAt, block.timestamp + DISPUTE_WINDOW, "ready after window");
    }

    function test_RevertWhen_AttestByNonVerifier() public {
        vm.expectRevert(Slashing.NotVerifier.selector);
        vm.prank(reporter);
        slashing.attestSpotCheckFailure(node, "rerun");
    }

    function test_RevertWhen_EmptyEvidence() public {
        vm.expectRevert(Slashing.EmptyEvidence.selector);
        vm.prank(verifier);
        slashing.attestSpotCheckFailure(node, "");
    }

    function test_DismissDuringDisputeWindow() public {
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.prank(owner);
        slashing.dismissCase(id);
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseClosed.selector);
        slashing.finalizeSlash(id);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
        vm.expectRevert(Slashing.CaseClosed.selector);
        vm.prank(owner);
        slashing.dismissCase(id);
    }

    function test_RevertWhen_DismissByNonOwner() public {
        vm.prank(verifier);
        bytes32 id = slashing.attestSpotCheckFailure(node, "rerun");
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, node));
        vm.prank(node);
        slashing.dismissCase(id);
    }

    function test_RevertWhen_FinalizeUnknownCase() public {
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(keccak256("nothing"));
    }

    function test_RevokedVerifierCannotAttest() public {
        vm.prank(owner);
        slashing.setVerifier(verifier, false);
        vm.expectRevert(Slashing.NotVerifier.selector);
        vm.prank(verifier);
        slashing.attestSpotCheckFailure(node, "rerun");
    }

    function test_RevertWhen_ZeroThreshold() public {
        vm.expectRevert(Slashing.BadParameter.selector);
        vm.prank(owner);
        slashing.setThreshold(0);
    }

    function test_RevertWhen_BadBps() public {
        vm.expectRevert(Slashing.BadParameter.selector);
        new Slashing(
            registry,
            settlement,
            owner,
            1,
            Slashing.Params({
                doubleSignSlashBps: 10_001,
                reporterRewardBps: 0,
                spotCheckSlashBps: 0,
                disputeWindow: 0,
                maxEvidenceAge: MAX_EVIDENCE_AGE
            })
        );
    }
}
