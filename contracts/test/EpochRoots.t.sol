// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Settlement} from "../src/Settlement.sol";
import {Slashing} from "../src/Slashing.sol";
import {Receipt} from "../src/lib/NectarTypes.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

/// @notice Issue 20: epoch roots are committed in order (empty epochs too) and correctable only within the
///         challenge period; spot-check cases cite final roots only.
contract EpochRootsTest is NectarFixture {
    event EpochRootCorrected(
        uint64 indexed epoch, bytes32 previous, bytes32 root, uint32 count, address indexed committer
    );

    function _commit(uint64 epoch, bytes32 root, uint32 count) internal {
        vm.prank(ledger);
        settlement.commitEpochRoot(epoch, root, count);
    }

    /// Before the fix: any epoch number could be committed once, so a committer (or a compromised key) squatted
    /// epoch 1,000,000 ahead of the ledger (this call succeeded and the number was lost for good).
    function test_Attack_SquatFarEpoch() public {
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, 1_000_000, 1));
        _commit(1_000_000, keccak256("squat"), 1);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, 0, 1));
        _commit(0, keccak256("zero"), 1);
        _commit(1, keccak256("r1"), 1);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, 3, 2));
        _commit(3, keccak256("r3"), 1);
        assertEq(uint256(settlement.latestEpoch()), 1, "latest");
    }

    /// An epoch of vouchers only is committed as (0, 0) so the next one can follow: the ledger never gets stuck.
    function test_EmptyEpochKeepsTheSequence() public {
        _commit(1, bytes32(0), 0);
        (bytes32 root, uint32 count, uint64 at) = settlement.epochRoot(1);
        assertEq(root, bytes32(0), "empty root");
        assertEq(uint256(count), 0, "no receipts");
        assertEq(uint256(at), block.timestamp, "but committed");
        assertEq(settlement.epochFinalAt(1), block.timestamp + CHALLENGE_PERIOD, "final at");
        assertFalse(settlement.verifyInclusion(1, bytes32(0), new bytes32[](0)), "nothing is in an empty epoch");
        _commit(2, keccak256("r2"), 3);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochAlreadyCommitted.selector, 1));
        _commit(1, keccak256("late"), 1);
        vm.startPrank(ledger);
        vm.expectRevert(Settlement.EmptyRoot.selector);
        settlement.commitEpochRoot(3, bytes32(0), 1);
        vm.expectRevert(Settlement.EmptyRoot.selector);
        settlement.commitEpochRoot(3, keccak256("r"), 0);
        vm.stopPrank();
    }

    /// Before the fix: a wrong root could never be corrected (EpochAlreadyCommitted). Now the committer replaces it
    /// within the challenge period, and the period still ends `challengePeriod` after the first commit.
    function test_CorrectRootWithinChallengePeriod() public {
        _commit(1, keccak256("wrong"), 2);
        vm.warp(block.timestamp + CHALLENGE_PERIOD - 1);
        vm.expectEmit(address(settlement));
        emit EpochRootCorrected(1, keccak256("wrong"), keccak256("right"), 3, ledger);
        vm.prank(ledger);
        settlement.correctEpochRoot(1, keccak256("right"), 3);
        (bytes32 root, uint32 count, uint64 at) = settlement.epochRoot(1);
        assertEq(root, keccak256("right"), "corrected");
        assertEq(uint256(count), 3, "count");
        assertEq(uint256(at) + CHALLENGE_PERIOD, block.timestamp + 1, "the period did not restart");
    }

    /// After the challenge period a root is final: not even the committer can swap it (and so pull a case's proof).
    function test_Attack_CorrectRootAfterChallengePeriod() public {
        _commit(1, keccak256("root"), 2);
        uint256 finalAt = block.timestamp + CHALLENGE_PERIOD;
        vm.warp(finalAt);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochRootFinal.selector, 1, finalAt));
        vm.prank(ledger);
        settlement.correctEpochRoot(1, keccak256("swap"), 2);
        (bytes32 root,,) = settlement.epochRoot(1);
        assertEq(root, keccak256("root"), "unchanged");
    }

    function test_RevertWhen_CorrectUncommittedOrByStranger() public {
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochNotCommitted.selector, 1));
        vm.prank(ledger);
        settlement.correctEpochRoot(1, keccak256("r"), 1);
        _commit(1, keccak256("r"), 1);
        vm.expectRevert(Settlement.NotRootCommitter.selector);
        vm.prank(client);
        settlement.correctEpochRoot(1, keccak256("mine"), 1);
    }

    /// A correction inside the challenge period changes what a case can prove: the receipt of the old root no
    /// longer verifies, the one of the new root does, and neither could back a case before the root was final.
    function test_CaseFollowsTheFinalRoot() public {
        Receipt memory wrong = _receipt(node, keccak256("s"), 1, keccak256("out-1"));
        Receipt memory right = _receipt(node, keccak256("s"), 2, keccak256("out-2"));
        _register(node, 1_000 ether);
        bytes32 wrongLeaf = _leaf(wrong); // computed before the prank: it is a call too
        bytes32 rightLeaf = _leaf(right);
        _commit(1, wrongLeaf, 1);
        bytes32[] memory none = new bytes32[](0);
        bytes memory sigWrong = _signReceipt(NODE_PK, wrong);
        vm.expectRevert(
            abi.encodeWithSelector(Slashing.EpochRootNotFinal.selector, 1, block.timestamp + CHALLENGE_PERIOD)
        );
        _attest(verifier, 1, wrong, sigWrong, none);
        vm.prank(ledger);
        settlement.correctEpochRoot(1, rightLeaf, 1);
        vm.warp(block.timestamp + CHALLENGE_PERIOD);
        vm.expectRevert(abi.encodeWithSelector(Slashing.ReceiptNotInEpoch.selector, 1));
        _attest(verifier, 1, wrong, sigWrong, none);
        _attest(verifier, 1, right, _signReceipt(NODE_PK, right), none);
        assertTrue(slashing.hasOpenCase(node), "case on the final root");
    }

    function test_RevertWhen_ChallengePeriodTooLong() public {
        uint256 tooLong = settlement.MAX_CHALLENGE_PERIOD() + 1;
        vm.expectRevert(Settlement.BadChallengePeriod.selector);
        new Settlement(credits, UNLOCK_DELAY, owner, treasury, FEE_BPS, tooLong);
    }

    /// Fuzz: whatever numbers a committer tries, only `latestEpoch + 1` is accepted, and the sequence has no gaps.
    function testFuzz_OnlyTheNextEpochCommits(uint64[8] memory tries) public {
        for (uint256 i; i < tries.length; ++i) {
            uint64 next = settlement.latestEpoch() + 1;
            uint64 epoch = tries[i] % 4 == 0 ? next : tries[i];
            vm.prank(ledger);
            try settlement.commitEpochRoot(epoch, keccak256(abi.encode(i)), 1) {
                assertEq(uint256(epoch), uint256(next), "only the next epoch");
            } catch {
                assertTrue(epoch != next, "the next epoch always commits");
            }
            assertLe(uint256(settlement.latestEpoch()), i + 1, "at most one epoch per commit");
        }
    }
}
