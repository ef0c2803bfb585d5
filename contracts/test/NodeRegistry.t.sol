// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {NodeRegistry} from "../src/NodeRegistry.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

contract NodeRegistryTest is NectarFixture {
    event NodeRegistered(address indexed node, string peerId, uint256 stake);
    event UnbondRequested(address indexed node, uint256 amount, uint256 unlockAt);
    event Unbonded(address indexed node, uint256 amount);
    event Slashed(address indexed node, uint256 amount, address indexed reporter, uint256 reward);

    function test_Register() public {
        _mint(node, MIN_STAKE);
        vm.startPrank(node);
        credits.approve(address(registry), MIN_STAKE);
        vm.expectEmit(address(registry));
        emit NodeRegistered(node, "12D3KooWpeer", MIN_STAKE);
        registry.register("12D3KooWpeer", MIN_STAKE);
        vm.stopPrank();
        (bool registered, string memory peerId, uint256 bonded, uint256 unbonding, uint256 unlockAt) =
            registry.nodeInfo(node);
        assertTrue(registered, "registered");
        assertEq(peerId, "12D3KooWpeer", "peer id");
        assertEq(bonded, MIN_STAKE, "bonded");
        assertEq(unbonding + unlockAt, 0, "nothing unbonding");
        assertEq(registry.stakeOf(node), MIN_STAKE, "stakeOf");
        assertEq(registry.nodeCount(), 1, "count");
        assertEq(registry.nodeList(0), node, "listed");
        assertEq(credits.balanceOf(address(registry)), MIN_STAKE, "tokens held");
    }

    function test_RevertWhen_RegisterTwice() public {
        _register(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.AlreadyRegistered.selector);
        vm.prank(node);
        registry.register("again", MIN_STAKE);
    }

    function testFuzz_RevertWhen_StakeBelowMinimum(uint256 stake) public {
        stake = bound(stake, 0, MIN_STAKE - 1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.StakeBelowMinimum.selector, stake, MIN_STAKE));
        vm.prank(node);
        registry.register("peer", stake);
    }

    function test_RevertWhen_PeerIdEmptyOrTooLong() public {
        vm.expectRevert(NodeRegistry.BadPeerId.selector);
        vm.prank(node);
        registry.register("", MIN_STAKE);
        bytes memory long = new bytes(129);
        vm.expectRevert(NodeRegistry.BadPeerId.selector);
        vm.prank(node);
        registry.register(string(long), MIN_STAKE);
    }

    function test_SetPeerId() public {
        _register(node, MIN_STAKE);
        vm.prank(node);
        registry.setPeerId("12D3KooWnew");
        (, string memory peerId,,,) = registry.nodeInfo(node);
        assertEq(peerId, "12D3KooWnew", "updated");
    }

    function test_RevertWhen_NotRegistered() public {
        vm.startPrank(node);
        vm.expectRevert(NodeRegistry.NotRegistered.selector);
        registry.setPeerId("x");
        vm.expectRevert(NodeRegistry.NotRegistered.selector);
        registry.addStake(1);
        vm.expectRevert(NodeRegistry.NotRegistered.selector);
        registry.requestUnbond(1);
        vm.expectRevert(NodeRegistry.NotRegistered.selector);
        registry.unbond();
        vm.stopPrank();
    }

    function testFuzz_AddStake(uint256 amount) public {
        amount = bound(amount, 1, type(uint96).max);
        _register(node, MIN_STAKE);
        _mint(node, amount);
        vm.startPrank(node);
        credits.approve(address(registry), amount);
        registry.addStake(amount);
        vm.stopPrank();
        assertEq(registry.stakeOf(node), MIN_STAKE + amount, "bonded");
    }

    function test_RevertWhen_AddZeroStake() public {
        _register(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.ZeroAmount.selector);
        vm.prank(node);
        registry.addStake(0);
    }

    function testFuzz_UnbondAfterDelay(uint256 amount) public {
        amount = bound(amount, 1, MIN_STAKE);
        _register(node, MIN_STAKE);
        vm.expectEmit(address(registry));
        emit UnbondRequested(node, amount, block.timestamp + UNBOND_DELAY);
        vm.prank(node);
        registry.requestUnbond(amount);
        assertEq(registry.stakeOf(node), MIN_STAKE - amount, "bonded shrinks at once");
        assertEq(registry.slashableOf(node), MIN_STAKE, "unbonding still slashable");

        vm.warp(block.timestamp + UNBOND_DELAY - 1);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.UnbondLocked.selector, block.timestamp + 1));
        vm.prank(node);
        registry.unbond();

        vm.warp(block.timestamp + 1);
        vm.expectEmit(address(registry));
        emit Unbonded(node, amount);
        vm.prank(node);
        registry.unbond();
        assertEq(credits.balanceOf(node), amount, "paid back");
    }

    function test_RevertWhen_UnbondMoreThanBonded() public {
        _register(node, MIN_STAKE);
        vm.expectRevert(abi.encodeWithSelector(NodeRegistry.InsufficientStake.selector, MIN_STAKE + 1, MIN_STAKE));
        vm.prank(node);
        registry.requestUnbond(MIN_STAKE + 1);
        vm.expectRevert(NodeRegistry.ZeroAmount.selector);
        vm.prank(node);
        registry.requestUnbond(0);
    }

    function test_RevertWhen_NothingUnbonding() public {
        _register(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.NothingUnbonding.selector);
        vm.prank(node);
        registry.unbond();
    }

    function test_RevertWhen_SlashByStranger() public {
        _register(node, MIN_STAKE);
        vm.expectRevert(NodeRegistry.NotSlasher.selector);
        vm.prank(client);
        registry.slash(node, 1, client, 0);
    }

    function testFuzz_SlashTakesBondedThenUnbonding(uint256 unbondAmount, uint256 slashAmount) public {
        unbondAmount = bound(unbondAmount, 0, MIN_STAKE);
        slashAmount = bound(slashAmount, 0, 3 * MIN_STAKE);
        _register(node, MIN_STAKE);
        if (unbondAmount != 0) {
            vm.prank(node);
            registry.requestUnbond(unbondAmount);
        }
        uint256 expected = slashAmount < MIN_STAKE ? slashAmount : MIN_STAKE;
        uint256 reward = expected / 10;
        vm.expectEmit(address(registry));
        emit Slashed(node, expected, client, reward);
        vm.prank(address(slashing));
        uint256 slashed = registry.slash(node, slashAmount, client, reward);
        assertEq(slashed, expected, "capped at stake");
        assertEq(registry.slashableOf(node), MIN_STAKE - expected, "stake left");
        assertEq(credits.balanceOf(client), reward, "reporter reward");
        assertEq(credits.balanceOf(treasury), expected - reward, "treasury");
        assertEq(credits.balanceOf(address(registry)), MIN_STAKE - expected, "tokens follow stake");
    }

    function test_RevertWhen_SlasherSetTwice() public {
        vm.expectRevert(NodeRegistry.SlasherAlreadySet.selector);
        vm.prank(owner);
        registry.setSlasher(client);
    }

    function test_RevertWhen_SlasherSetByNonOwner() public {
        NodeRegistry fresh = new NodeRegistry(credits, MIN_STAKE, UNBOND_DELAY, treasury, owner);
        vm.expectRevert(abi.encodeWithSelector(Ownable.OwnableUnauthorizedAccount.selector, client));
        vm.prank(client);
        fresh.setSlasher(client);
    }
}
