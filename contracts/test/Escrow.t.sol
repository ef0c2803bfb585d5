// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Escrow} from "../src/Escrow.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

contract EscrowTest is NectarFixture {
    event Deposited(address indexed client, uint256 amount, uint256 balance);
    event WithdrawalRequested(address indexed client, uint256 amount, uint256 unlockAt);
    event Withdrawn(address indexed client, uint256 amount);
    event EarningsWithdrawn(address indexed payee, uint256 amount);

    function test_Deposit() public {
        _mint(client, 10 ether);
        vm.startPrank(client);
        credits.approve(address(escrow), 10 ether);
        vm.expectEmit(address(escrow));
        emit Deposited(client, 4 ether, 4 ether);
        escrow.deposit(4 ether);
        vm.stopPrank();
        assertEq(escrow.balanceOf(client), 4 ether, "escrow balance");
        assertEq(credits.balanceOf(address(escrow)), 4 ether, "vault holds tokens");
        assertEq(credits.balanceOf(client), 6 ether, "client wallet");
    }

    function testFuzz_DepositAccumulates(uint256 a, uint256 b) public {
        a = bound(a, 1, type(uint128).max / 2);
        b = bound(b, 1, type(uint128).max / 2);
        _deposit(client, a);
        _deposit(client, b);
        assertEq(escrow.balanceOf(client), a + b, "sum of deposits");
    }

    function test_DepositFor() public {
        _mint(address(this), 2 ether);
        credits.approve(address(escrow), 2 ether);
        escrow.depositFor(client, 2 ether);
        assertEq(escrow.balanceOf(client), 2 ether, "credited to client");
    }

    function test_DepositWithPermit() public {
        _mint(client, 5 ether);
        bytes32 typehash =
            keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
        bytes32 structHash = keccak256(abi.encode(typehash, client, address(escrow), 5 ether, 0, block.timestamp));
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", credits.DOMAIN_SEPARATOR(), structHash));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(CLIENT_PK, digest);
        vm.prank(client);
        escrow.depositWithPermit(5 ether, block.timestamp, v, r, s);
        assertEq(escrow.balanceOf(client), 5 ether, "deposited in one tx");
    }

    function test_RevertWhen_DepositZero() public {
        vm.expectRevert(Escrow.ZeroAmount.selector);
        vm.prank(client);
        escrow.deposit(0);
    }

    function test_RevertWhen_DepositWithoutAllowance() public {
        _mint(client, 1 ether);
        vm.expectRevert();
        vm.prank(client);
        escrow.deposit(1 ether);
    }

    function test_RevertWhen_DepositAbove128Bits() public {
        uint256 huge = uint256(type(uint128).max) + 1;
        _mint(client, huge);
        vm.startPrank(client);
        credits.approve(address(escrow), huge);
        vm.expectRevert(Escrow.AmountTooLarge.selector);
        escrow.deposit(huge);
        vm.stopPrank();
    }

    function test_WithdrawAfterDelay() public {
        _deposit(client, 10 ether);
        vm.expectEmit(address(escrow));
        emit WithdrawalRequested(client, 4 ether, block.timestamp + UNLOCK_DELAY);
        vm.prank(client);
        escrow.requestWithdrawal(4 ether);
        vm.warp(block.timestamp + UNLOCK_DELAY);
        vm.expectEmit(address(escrow));
        emit Withdrawn(client, 4 ether);
        vm.prank(client);
        escrow.withdraw();
        assertEq(escrow.balanceOf(client), 6 ether, "rest stays");
        assertEq(credits.balanceOf(client), 4 ether, "paid out");
        (uint256 pending, uint256 at) = escrow.pendingWithdrawal(client);
        assertEq(pending + at, 0, "request cleared");
    }

    function testFuzz_RevertWhen_WithdrawBeforeUnlock(uint256 elapsed) public {
        elapsed = bound(elapsed, 0, UNLOCK_DELAY - 1);
        _deposit(client, 1 ether);
        vm.prank(client);
        escrow.requestWithdrawal(1 ether);
        uint256 unlockAt = block.timestamp + UNLOCK_DELAY;
        vm.warp(block.timestamp + elapsed);
        vm.expectRevert(abi.encodeWithSelector(Escrow.WithdrawalLocked.selector, unlockAt));
        vm.prank(client);
        escrow.withdraw();
    }

    function test_SettlementCanSpendDuringUnlockDelay() public {
        // The point of the delay: work already done is still paid while a withdrawal waits.
        _deposit(client, 10 ether);
        vm.prank(client);
        escrow.requestWithdrawal(10 ether);
        _settleOne(CLIENT_PK, node, 1, 7 ether);
        vm.warp(block.timestamp + UNLOCK_DELAY);
        vm.prank(client);
        uint256 amount = escrow.withdraw();
        assertEq(amount, 3 ether, "only what settlement left");
        assertEq(escrow.balanceOf(client), 0, "emptied");
    }

    function test_RevertWhen_WithdrawWithoutRequest() public {
        _deposit(client, 1 ether);
        vm.expectRevert(Escrow.NoPendingWithdrawal.selector);
        vm.prank(client);
        escrow.withdraw();
    }

    function test_RevertWhen_RequestZero() public {
        vm.expectRevert(Escrow.ZeroAmount.selector);
        vm.prank(client);
        escrow.requestWithdrawal(0);
    }

    function test_RevertWhen_RequestAboveBalance() public {
        _deposit(client, 1 ether);
        vm.expectRevert(abi.encodeWithSelector(Escrow.InsufficientBalance.selector, 2 ether, 1 ether));
        vm.prank(client);
        escrow.requestWithdrawal(2 ether);
    }

    function test_NewRequestRestartsTimer() public {
        _deposit(client, 5 ether);
        vm.prank(client);
        escrow.requestWithdrawal(1 ether);
        vm.warp(block.timestamp + UNLOCK_DELAY - 1);
        vm.prank(client);
        escrow.requestWithdrawal(2 ether);
        vm.warp(block.timestamp + 1);
        vm.expectRevert(abi.encodeWithSelector(Escrow.WithdrawalLocked.selector, block.timestamp - 1 + UNLOCK_DELAY));
        vm.prank(client);
        escrow.withdraw();
    }

    function test_WithdrawEarnings() public {
        _deposit(client, 10 ether);
        _settleOne(CLIENT_PK, node, 1, 1 ether);
        uint256 net = 1 ether - _fee(1 ether);
        assertEq(escrow.earningsOf(node), net, "node earnings");
        vm.expectEmit(address(escrow));
        emit EarningsWithdrawn(node, net);
        vm.prank(node);
        escrow.withdrawEarnings();
        assertEq(credits.balanceOf(node), net, "paid");
        assertEq(escrow.earningsOf(node), 0, "drained");
        vm.prank(treasury);
        escrow.withdrawEarnings();
        assertEq(credits.balanceOf(treasury), 1 ether - net, "fee paid");
    }

    function test_RevertWhen_NoEarnings() public {
        vm.expectRevert(Escrow.NoEarnings.selector);
        vm.prank(node);
        escrow.withdrawEarnings();
    }
}
