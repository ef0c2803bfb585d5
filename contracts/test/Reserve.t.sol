// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Escrow} from "../src/Escrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

/// @notice Per-node reserves (issue 20, backed vouchers): a node that a client reserved for is paid up to the
///         reserve whatever the client does with the rest of its escrow, and no other node can draw on it.
contract ReserveTest is NectarFixture {
    event ReserveFunded(address indexed client, address indexed node, uint256 amount, uint256 reserve);
    event ReserveReleaseRequested(address indexed client, address indexed node, uint256 amount, uint256 releaseAt);
    event ReserveReleased(address indexed client, address indexed node, uint256 amount);
    event ReserveDrawn(address indexed client, address indexed node, uint256 amount, uint256 reserve);
    event VoucherSkipped(
        address indexed client, address indexed node, uint64 indexed channelId, uint256 index, uint8 reason
    );

    uint8 internal constant INSUFFICIENT_ESCROW = 2; // Settlement.SKIP_INSUFFICIENT_ESCROW
    uint8 internal constant PARTLY_PAID = 3; // Settlement.SKIP_PARTLY_PAID

    function setUp() public override {
        super.setUp();
        _deposit(client, 100 ether);
    }

    function _reserve(address who, address to, uint256 amount) internal {
        vm.prank(who);
        escrow.reserve(to, amount);
    }

    function _reserved(address who, address to) internal view returns (uint256 amount) {
        (amount,,) = escrow.reserveOf(who, to);
    }

    /// @dev Settles one voucher and returns what it paid in gross.
    function _settle(address to, uint64 channelId, uint128 cumulative) internal returns (uint256) {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _single(CLIENT_PK, to, channelId, cumulative);
        return settlement.settle(nodes, groups);
    }

    /*//////////////////////////////////////////////////////////////
                                 ATTACKS
    //////////////////////////////////////////////////////////////*/

    /// @dev Over-commit: the client reserves 40 for `node`, then signs 100 to node2 and 40 to `node` (140 against
    ///      an escrow of 100). node2's voucher settles first and takes all the free balance; `node` is still paid
    ///      its 40 in full, from the reserve. Before reserves `node` got nothing (SKIP_INSUFFICIENT_ESCROW).
    function test_Attack_OverCommitToSeveralNodes_ReservedNodeStillPaid() public {
        _reserve(client, node, 40 ether);
        assertEq(escrow.balanceOf(client), 60 ether, "free balance");
        assertEq(_settle(node2, 0, 100 ether), 0, "node2's over-commit: no reserve, nothing paid");
        assertEq(_settle(node2, 1, 60 ether), 60 ether, "node2 takes the free balance");
        assertEq(escrow.balanceOf(client), 0, "free balance gone");

        vm.expectEmit(address(settlement));
        emit ReserveDrawn(client, node, 40 ether, 0);
        assertEq(_settle(node, 0, 40 ether), 40 ether, "the reserved node is paid in full");
        assertEq(escrow.earningsOf(node), 40 ether - _fee(40 ether), "node's earnings");
        assertEq(_reserved(client, node), 0, "reserve spent");
    }

    /// @dev Withdraw race: the client asks to withdraw everything it can at once and withdraws at unlock, before the
    ///      node settles; the reserve stays behind for the node.
    function test_Attack_WithdrawBeforeSettlement_ReservedNodeStillPaid() public {
        _reserve(client, node, 30 ether);
        vm.prank(client);
        vm.expectRevert(abi.encodeWithSelector(Escrow.InsufficientBalance.selector, 100 ether, 70 ether));
        escrow.requestWithdrawal(100 ether); // the reserve is not the client's to withdraw
        vm.prank(client);
        escrow.requestWithdrawal(70 ether);
        vm.warp(block.timestamp + UNLOCK_DELAY);
        vm.prank(client);
        assertEq(escrow.withdraw(), 70 ether, "withdrew the free balance");

        assertEq(_settle(node, 3, 30 ether), 30 ether, "the reserved node is still paid");
        assertEq(escrow.earningsOf(node), 30 ether - _fee(30 ether), "node's earnings");
    }

    /// @dev Only vouchers to the named node draw on its reserve: node2 finds nothing to take.
    function test_Attack_OnlyTheNamedNodeDraws() public {
        _reserve(client, node, 100 ether);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node2, 0, 0, INSUFFICIENT_ESCROW);
        assertEq(_settle(node2, 0, 1 ether), 0, "node2 cannot draw on node's reserve");
        assertEq(_reserved(client, node), 100 ether, "reserve untouched");
        // a voucher naming node2 as partner is still a voucher to node2
        address[] memory nodes = new address[](2);
        nodes[0] = node2;
        nodes[1] = node;
        Settlement.ClientVouchers[] memory groups = new Settlement.ClientVouchers[](1);
        groups[0].client = client;
        groups[0].vouchers = new Settlement.SignedVoucher[](1);
        groups[0].vouchers[0] = _pairedVoucher(CLIENT_PK, node2, node, 0, 1, 5, 1 ether);
        assertEq(settlement.settle(nodes, groups), 0, "partner of the reserved node: nothing");
        assertEq(_reserved(client, node), 100 ether, "reserve still untouched");
    }

    /// @dev A release takes the unlock delay, during which the node still settles against the reserve.
    function test_Attack_ReleaseWaitsTheUnlockDelay() public {
        _reserve(client, node, 50 ether);
        vm.prank(client);
        escrow.requestWithdrawal(50 ether);
        vm.warp(block.timestamp + UNLOCK_DELAY);
        vm.prank(client);
        escrow.withdraw(); // the free 50 leaves; a withdrawal cannot take the reserve
        uint256 at = block.timestamp + UNLOCK_DELAY;
        vm.expectEmit(address(escrow));
        emit ReserveReleaseRequested(client, node, 50 ether, at);
        vm.prank(client);
        escrow.requestReserveRelease(node, 50 ether);
        vm.warp(at - 1);
        vm.prank(client);
        vm.expectRevert(abi.encodeWithSelector(Escrow.ReleaseLocked.selector, node, at));
        escrow.releaseReserve(node);

        assertEq(_settle(node, 0, 20 ether), 20 ether, "the node settles during the delay");
        vm.warp(at);
        vm.expectEmit(address(escrow));
        emit ReserveReleased(client, node, 30 ether);
        vm.prank(client);
        assertEq(escrow.releaseReserve(node), 30 ether, "only what the node left");
        assertEq(escrow.balanceOf(client), 30 ether, "back in the free balance");
        assertEq(_reserved(client, node), 0, "reserve empty");
        (, uint256 pending, uint256 releaseAt) = escrow.reserveOf(client, node);
        assertEq(pending + releaseAt, 0, "request cleared");
    }

    /*//////////////////////////////////////////////////////////////
                                BEHAVIOUR
    //////////////////////////////////////////////////////////////*/

    function test_ReserveMovesFreeBalance() public {
        vm.expectEmit(address(escrow));
        emit ReserveFunded(client, node, 25 ether, 25 ether);
        _reserve(client, node, 25 ether);
        _reserve(client, node, 5 ether);
        assertEq(_reserved(client, node), 30 ether, "reserve");
        assertEq(escrow.balanceOf(client), 70 ether, "free");
        assertEq(credits.balanceOf(address(escrow)), 100 ether, "the vault holds both");
    }

    function test_FreeBalanceIsSpentFirst() public {
        _reserve(client, node, 50 ether);
        assertEq(_settle(node, 0, 30 ether), 30 ether, "paid");
        assertEq(escrow.balanceOf(client), 20 ether, "from the free balance");
        assertEq(_reserved(client, node), 50 ether, "reserve kept");
        vm.expectEmit(address(settlement));
        emit ReserveDrawn(client, node, 10 ether, 40 ether);
        assertEq(_settle(node, 0, 60 ether), 30 ether, "the rise: free 20, then 10 from the reserve");
        assertEq(escrow.balanceOf(client), 0, "free used up");
    }

    /// @dev A voucher above free + reserve pays what they hold (the lane rises by that) and says so; a later voucher
    ///      on the same channel pays the rest once the client tops up.
    function test_PartlyPaidThenRest() public {
        _reserve(client, node, 100 ether);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 2, 0, PARTLY_PAID);
        assertEq(_settle(node, 2, 130 ether), 100 ether, "paid what the reserve held");
        assertEq(settlement.paid(client, node, node, 2), 100 ether, "lane rose by the part paid");
        _deposit(client, 30 ether);
        assertEq(_settle(node, 2, 130 ether), 30 ether, "the same voucher pays the rest");
        assertEq(escrow.earningsOf(node) + escrow.earningsOf(treasury), 130 ether, "conserved");
    }

    function test_ReserveDrawnTopic() public pure {
        assertEq(
            keccak256("ReserveDrawn(address,address,uint256,uint256)"),
            0xed6e45be144100498010e002bc1bb1d47715201c5ae9e075dc7f8686e7924383,
            "the topic hard-coded in _settleVouchers"
        );
    }

    function test_RevertWhen_ReserveBadInput() public {
        vm.startPrank(client);
        vm.expectRevert(Escrow.ZeroAmount.selector);
        escrow.reserve(node, 0);
        vm.expectRevert(Escrow.BadReserveNode.selector);
        escrow.reserve(address(0), 1);
        vm.expectRevert(Escrow.BadReserveNode.selector);
        escrow.reserve(client, 1);
        vm.expectRevert(abi.encodeWithSelector(Escrow.InsufficientBalance.selector, 101 ether, 100 ether));
        escrow.reserve(node, 101 ether);
        vm.expectRevert(abi.encodeWithSelector(Escrow.InsufficientReserve.selector, node, 1, 0));
        escrow.requestReserveRelease(node, 1);
        vm.expectRevert(abi.encodeWithSelector(Escrow.NoPendingRelease.selector, node));
        escrow.releaseReserve(node);
        vm.stopPrank();
    }

    /// @dev Whatever a client signs to other nodes first, the reserved node is paid min(its voucher, free + reserve).
    function testFuzz_ReservedNodePaidWhateverOthersTake(uint256 reserved, uint256 others, uint256 owed) public {
        reserved = bound(reserved, 1, 100 ether);
        others = bound(others, 1, 100 ether);
        owed = bound(owed, 1, reserved);
        _reserve(client, node, reserved);
        uint256 free = 100 ether - reserved;
        if (others <= free) _settle(node2, 0, uint128(others));
        assertEq(_settle(node, 0, uint128(owed)), owed, "reserved node paid in full");
        assertEq(credits.balanceOf(address(escrow)), 100 ether, "nothing left the vault");
    }
}
