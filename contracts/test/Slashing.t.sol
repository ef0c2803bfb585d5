// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

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
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        bytes32 expected = slashing.caseId(r);
        assertEq(expected, settlement.receiptLeaf(r), "case id is the receipt's leaf");
        vm.expectEmit(address(slashing));
        emit SpotCheckCaseReady(expected, node, block.timestamp + DISPUTE_WINDOW);
        bytes32 id = _attest(verifier, epoch, r, sig, proof);
        assertEq(id, expected, "case id");
        (address accused,,,, uint64 cited, bytes32 record) = slashing.caseInfo(id);
        assertEq(accused, node, "the receipt's node");
        assertEq(uint256(cited), uint256(epoch), "cited epoch");
        assertEq(record, keccak256("re-execution record"), "record hash");

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
        _attest(verifier, epoch, r, sig, proof);
    }

    function test_KOfNThreshold() public {
        address verifier2 = address(0x7E42);
        address verifier3 = address(0x7E43);
        vm.startPrank(manager);
        slashing.setVerifier(verifier2, true);
        slashing.setVerifier(verifier3, true);
        slashing.setThreshold(2);
        vm.stopPrank();

        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        bytes32 id = _attest(verifier, epoch, r, sig, proof);
        (, uint256 attestations, uint256 readyAt,,,) = slashing.caseInfo(id);
        assertEq(attestations, 1, "one attestation");
        assertEq(readyAt, 0, "not ready at 1 of 2");
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(id);

        vm.expectRevert(Slashing.AlreadyAttested.selector);
        _attest(verifier, epoch, r, sig, proof);

        _attest(verifier3, epoch, r, sig, proof);
        (, attestations, readyAt,,,) = slashing.caseInfo(id);
        assertEq(attestations, 2, "two attestations");
        assertEq(readyAt, block.timestamp + DISPUTE_WINDOW, "ready after window");
    }

    function test_RevertWhen_AttestByNonVerifier() public {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        vm.expectRevert(Slashing.NotVerifier.selector);
        _attest(reporter, epoch, r, sig, proof);
    }

    function test_RevertWhen_EmptyRecordHash() public {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        vm.expectRevert(Slashing.EmptyEvidence.selector);
        vm.prank(verifier);
        slashing.attestSpotCheckFailure(epoch, r, sig, proof, bytes32(0));
    }

    function test_DismissDuringDisputeWindow() public {
        bytes32 id = _openCase(NODE_PK, "bad-output");
        vm.prank(arbiter);
        slashing.dismissCase(id);
        vm.warp(block.timestamp + DISPUTE_WINDOW);
        vm.expectRevert(Slashing.CaseClosed.selector);
        slashing.finalizeSlash(id);
        assertEq(registry.slashableOf(node), STAKE, "stake intact");
        vm.expectRevert(Slashing.CaseClosed.selector);
        vm.prank(arbiter);
        slashing.dismissCase(id);
    }

    function test_RevertWhen_DismissByNonArbiter() public {
        bytes32 id = _openCase(NODE_PK, "bad-output");
        vm.expectRevert(Slashing.NotArbiter.selector);
        vm.prank(node);
        slashing.dismissCase(id);
    }

    function test_RevertWhen_DismissUnknownCase() public {
        vm.expectRevert(Slashing.CaseClosed.selector);
        vm.prank(arbiter);
        slashing.dismissCase(keccak256("nothing"));
    }

    function test_RevertWhen_FinalizeUnknownCase() public {
        vm.expectRevert(Slashing.CaseNotReady.selector);
        slashing.finalizeSlash(keccak256("nothing"));
    }

    function test_RevokedVerifierCannotAttest() public {
        (uint64 epoch, Receipt memory r, bytes memory sig, bytes32[] memory proof) = _citable(NODE_PK, "bad-output");
        vm.prank(manager);
        slashing.setVerifier(verifier, false);
        vm.expectRevert(Slashing.NotVerifier.selector);
        _attest(verifier, epoch, r, sig, proof);
    }

    function test_RevertWhen_ZeroThreshold() public {
        vm.expectRevert(Slashing.BadParameter.selector);
        vm.prank(manager);
        slashing.setThreshold(0);
    }

    function test_RolesHandOverButNeverMerge() public {
        vm.expectRevert(Slashing.BadRole.selector);
        vm.prank(arbiter);
        slashing.setArbiter(manager);
        vm.expectRevert(Slashing.BadRole.selector);
        vm.prank(manager);
        slashing.setVerifierManager(arbiter);
        vm.expectRevert(Slashing.NotArbiter.selector);
        vm.prank(manager);
        slashing.setArbiter(address(0xBEEF));

        vm.prank(arbiter);
        slashing.setArbiter(address(0xBEEF));
        assertEq(slashing.arbiter(), address(0xBEEF), "new arbiter");
        vm.prank(manager);
        slashing.setVerifierManager(address(0xCAFE));
        assertEq(slashing.verifierManager(), address(0xCAFE), "new manager");
    }

    function test_RevertWhen_RolesShareAKey() public {
        vm.expectRevert(Slashing.BadRole.selector);
        new Slashing(registry, settlement, owner, owner, 1, _slashParams());
        vm.expectRevert(Slashing.BadRole.selector);
        new Slashing(registry, settlement, address(0), manager, 1, _slashParams());
    }

    function test_RevertWhen_ChallengePeriodLeavesNoTimeForCases() public {
        Slashing.Params memory p = _slashParams();
        p.maxEvidenceAge = CHALLENGE_PERIOD; // a root would expire as it becomes final
        vm.expectRevert(
            abi.encodeWithSelector(Slashing.ChallengePeriodTooLong.selector, CHALLENGE_PERIOD, CHALLENGE_PERIOD)
        );
        new Slashing(registry, settlement, arbiter, manager, 1, p);
    }

    function test_RevertWhen_ZeroCaseCap() public {
        Slashing.Params memory p = _slashParams();
        p.maxCasesPerEpoch = 0;
        vm.expectRevert(Slashing.BadParameter.selector);
        new Slashing(registry, settlement, arbiter, manager, 1, p);
    }

    function test_RevertWhen_BadBps() public {
        vm.expectRevert(Slashing.BadParameter.selector);
        Slashing.Params memory p = _slashParams();
        p.doubleSignSlashBps = 10_001;
        new Slashing(registry, settlement, arbiter, manager, 1, p);
    }
}
