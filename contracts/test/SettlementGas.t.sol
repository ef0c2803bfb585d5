// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Settlement} from "../src/Settlement.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

/// @notice Batches of 100 vouchers for `forge test --gas-report` and `forge snapshot`. The reference figures are
///         real transactions on Anvil (benchmarks/gas/settle_gas.py); these track regressions between commits.
contract SettlementGasTest is NectarFixture {
    uint256 internal constant BATCH = 100;
    uint256 internal constant CLIENTS = 4;
    uint256 internal constant NODES = 5;

    uint256[CLIENTS] internal clientKeys;
    address[] internal nodeList;

    function setUp() public override {
        super.setUp();
        for (uint256 c; c < CLIENTS; ++c) {
            clientKeys[c] = 0xBA7C4 + c;
            _deposit(vm.addr(clientKeys[c]), 1_000 ether);
        }
        for (uint256 n; n < NODES; ++n) {
            nodeList.push(address(uint160(0xE0DE + n)));
        }
    }

    /// @dev 4 clients x 5 nodes x 5 channels each (a client's 5 wallets, channel ids 0..4, each paying every node):
    ///      every voucher a distinct channel; channels 0/1 and 2/3 of a (client, node) share a slot, 4 is alone.
    function _batch(uint128 amount) internal view returns (Settlement.ClientVouchers[] memory groups) {
        groups = new Settlement.ClientVouchers[](CLIENTS);
        uint256 perClient = BATCH / CLIENTS;
        for (uint256 c; c < CLIENTS; ++c) {
            groups[c].client = vm.addr(clientKeys[c]);
            groups[c].vouchers = new Settlement.SignedVoucher[](perClient);
            for (uint256 i; i < perClient; ++i) {
                uint256 n = i % NODES;
                groups[c].vouchers[i] = _voucher(clientKeys[c], nodeList[n], n, uint64(i / NODES), amount + uint128(i));
            }
        }
    }

    function test_Gas_Settle100_FirstEverVouchers() public {
        Settlement.ClientVouchers[] memory groups = _batch(1 ether);
        settlement.settle(nodeList, groups);
        assertEq(escrow.balanceOf(vm.addr(clientKeys[0])), 1_000 ether - 25 ether - 300, "charged");
    }

    function test_Gas_Settle100_WarmChannels() public {
        settlement.settle(nodeList, _batch(1 ether));
        Settlement.ClientVouchers[] memory groups = _batch(2 ether);
        settlement.settle(nodeList, groups);
        assertEq(escrow.balanceOf(vm.addr(clientKeys[0])), 1_000 ether - 50 ether - 300, "charged");
    }
}
