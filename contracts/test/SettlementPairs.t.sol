// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Settlement} from "../src/Settlement.sol";
import {NectarFixture} from "./utils/NectarFixture.sol";

/// @notice Channels 2k and 2k + 1 of one (client, node) share a storage slot (two 128-bit lanes): each lane keeps
///         its own paid total, replays are caught per lane, and the slot is never shared across clients or nodes.
contract SettlementPairsTest is NectarFixture {
    uint256 internal constant MAX128 = type(uint128).max;

    event VoucherSkipped(
        address indexed client, address indexed node, uint64 indexed channelId, uint256 index, uint8 reason
    );

    function setUp() public override {
        super.setUp();
        _deposit(client, 100 ether);
        _deposit(client2, 100 ether);
    }

    function _two(uint64 a, uint64 b) internal pure returns (uint64[] memory ids) {
        ids = new uint64[](2);
        (ids[0], ids[1]) = (a, b);
    }

    function _amounts(uint128 a, uint128 b) internal pure returns (uint128[] memory out) {
        out = new uint128[](2);
        (out[0], out[1]) = (a, b);
    }

    function test_PairNeighboursSettleTogether() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
            _group(CLIENT_PK, node, _two(6, 7), _amounts(3 ether, 1 ether));
        assertEq(settlement.settle(nodes, groups), 4 ether, "gross");
        assertEq(settlement.paid(client, node, node, 6), 3 ether, "lane 0");
        assertEq(settlement.paid(client, node, node, 7), 1 ether, "lane 1");
        assertEq(settlement.paid(client, node, node, 5), 0, "previous pair untouched");
        assertEq(settlement.paid(client, node, node, 8), 0, "next pair untouched");
        assertEq(escrow.balanceOf(client), 96 ether, "charged both");
        assertEq(escrow.earningsOf(node), 4 ether - _fee(4 ether), "node paid both");
    }

    function test_NeighbourLaneIsNotThisLanesPaidTotal() public {
        _settleOne(CLIENT_PK, node, 6, 3 ether);
        _settleOne(CLIENT_PK, node, 7, 5 ether);
        // 4 ether is below lane 1's total but above lane 0's: lane 0 pays the 1 ether rise
        _settleOne(CLIENT_PK, node, 6, 4 ether);
        assertEq(settlement.paid(client, node, node, 6), 4 ether, "lane 0");
        assertEq(settlement.paid(client, node, node, 7), 5 ether, "lane 1 kept");
        assertEq(escrow.balanceOf(client), 91 ether, "charged 4 + 5");
    }

    function test_SkipWhen_ReplayInSharedSlot() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
            _group(CLIENT_PK, node, _two(6, 7), _amounts(3 ether, 5 ether));
        settlement.settle(nodes, groups);
        // each lane's own last voucher is a replay, whatever its neighbour holds
        (nodes, groups) = _single(CLIENT_PK, node, 6, 3 ether);
        assertEq(settlement.settle(nodes, groups), 0, "replay skipped");
        (nodes, groups) = _single(CLIENT_PK, node, 7, 5 ether);
        assertEq(settlement.settle(nodes, groups), 0, "replay skipped");
        (nodes, groups) = _single(CLIENT_PK, node, 7, 4 ether);
        assertEq(settlement.settle(nodes, groups), 0, "replay skipped");
    }

    function test_SkipWhen_LaneRepeatedInsideBatchAfterNeighbour() public {
        uint64[] memory ids = new uint64[](3);
        (ids[0], ids[1], ids[2]) = (6, 7, 6);
        uint128[] memory amounts = new uint128[](3);
        (amounts[0], amounts[1], amounts[2]) = (3 ether, 9 ether, 3 ether);
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _group(CLIENT_PK, node, ids, amounts);
        vm.expectEmit(address(settlement));
        emit VoucherSkipped(client, node, 6, 2, 1); // SKIP_ALREADY_SETTLED
        assertEq(settlement.settle(nodes, groups), 12 ether, "the repeat is skipped");
    }

    function test_PairIsPerClientAndNode() public {
        _settleOne(CLIENT_PK, node, 6, 3 ether);
        _settleOne(CLIENT2_PK, node, 7, 2 ether); // same pair number, another client
        _settleOne(CLIENT_PK, node2, 7, 1 ether); // same pair number, another node
        assertEq(settlement.paid(client, node, node, 6), 3 ether, "client/node lane 0");
        assertEq(settlement.paid(client, node, node, 7), 0, "client/node lane 1 untouched");
        assertEq(settlement.paid(client2, node, node, 7), 2 ether, "client2/node");
        assertEq(settlement.paid(client2, node, node, 6), 0, "client2/node lane 0 untouched");
        assertEq(settlement.paid(client, node2, node2, 7), 1 ether, "client/node2");
        assertEq(settlement.paid(client, node2, node2, 6), 0, "client/node2 lane 0 untouched");
    }

    /// @dev A full lane (2^128 - 1) never spills into its neighbour, in either lane, with the top pair id.
    function testFuzz_FullLaneDoesNotSpill(bool upper, uint64 pair) public {
        pair = uint64(bound(pair, 0, type(uint64).max >> 1));
        uint64 id = pair << 1 | (upper ? 1 : 0);
        _deposit(node2, MAX128); // node2's key as a fresh client with a full escrow
        _settleOne(NODE2_PK, node, id, uint128(MAX128));
        assertEq(settlement.paid(node2, node, node, id), MAX128, "full lane");
        assertEq(settlement.paid(node2, node, node, id ^ 1), 0, "neighbour empty");
        assertEq(escrow.balanceOf(node2), 0, "all charged");
    }

    /// @dev Two lanes of one slot, settled together or apart, in either order, then raised: each pays exactly its
    ///      own rises and keeps its own total; the last voucher of each is a replay.
    function testFuzz_PairLanesKeepTheirOwnTotals(
        uint64 pair,
        uint256 first0,
        uint256 first1,
        uint256 rise0,
        uint256 rise1,
        bool together
    ) public {
        pair = uint64(bound(pair, 0, type(uint64).max >> 1));
        first0 = bound(first0, 1, MAX128 / 4);
        first1 = bound(first1, 1, MAX128 / 4);
        rise0 = bound(rise0, 1, MAX128 / 4);
        rise1 = bound(rise1, 1, MAX128 / 4);
        (uint64 id0, uint64 id1) = (pair << 1, pair << 1 | 1);
        _deposit(node2, MAX128);
        address payer = node2;
        if (together) {
            (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
                _group(NODE2_PK, node, _two(id1, id0), _amounts(uint128(first1), uint128(first0)));
            settlement.settle(nodes, groups);
        } else {
            _settleOne(NODE2_PK, node, id0, uint128(first0));
            _settleOne(NODE2_PK, node, id1, uint128(first1));
        }
        assertEq(settlement.paid(payer, node, node, id0), first0, "lane 0 first");
        assertEq(settlement.paid(payer, node, node, id1), first1, "lane 1 first");
        (address[] memory nodes2, Settlement.ClientVouchers[] memory groups2) =
            _group(NODE2_PK, node, _two(id0, id1), _amounts(uint128(first0 + rise0), uint128(first1 + rise1)));
        assertEq(settlement.settle(nodes2, groups2), rise0 + rise1, "pays the rises only");
        assertEq(settlement.paid(payer, node, node, id0), first0 + rise0, "lane 0 raised");
        assertEq(settlement.paid(payer, node, node, id1), first1 + rise1, "lane 1 raised");
        assertEq(escrow.balanceOf(payer), MAX128 - first0 - first1 - rise0 - rise1, "charged exactly");
        assertEq(settlement.settle(nodes2, groups2), 0, "replay skipped");
    }

    /*//////////////////////////////////////////////////////////////
                  ROUTE PAIRS: ONE CLIENT, TWO NODES
    //////////////////////////////////////////////////////////////*/

    /// @dev A batch paying `node` (partner node2) `a` and node2 (partner node) `b` on `channelId`.
    function _routePair(uint256 clientPk, uint64 channelId, uint128 a, uint128 b)
        internal
        view
        returns (address[] memory nodes, Settlement.ClientVouchers[] memory groups)
    {
        nodes = new address[](2);
        (nodes[0], nodes[1]) = (node, node2);
        groups = new Settlement.ClientVouchers[](1);
        groups[0].client = vm.addr(clientPk);
        groups[0].vouchers = new Settlement.SignedVoucher[](2);
        groups[0].vouchers[0] = _pairedVoucher(clientPk, node, node2, 0, 1, channelId, a);
        groups[0].vouchers[1] = _pairedVoucher(clientPk, node2, node, 1, 0, channelId, b);
    }

    function test_RoutePairPaysEachNodeItsLane() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _routePair(CLIENT_PK, 9, 3 ether, 1 ether);
        assertEq(settlement.settle(nodes, groups), 4 ether, "gross");
        assertEq(settlement.paid(client, node, node2, 9), 3 ether, "node's lane");
        assertEq(settlement.paid(client, node2, node, 9), 1 ether, "node2's lane");
        assertEq(settlement.paid(client, node, node, 9), 0, "node's own channel 9 untouched");
        assertEq(settlement.paid(client, node2, node2, 9), 0, "node2's own channel 9 untouched");
        assertEq(settlement.paid(client, node, node2, 8), 0, "neighbour channel id untouched");
        assertEq(settlement.paid(client, node, node2, 10), 0, "next channel id untouched");
        assertEq(escrow.earningsOf(node), 3 ether - _fee(3 ether), "node paid its voucher");
        assertEq(escrow.earningsOf(node2), 1 ether - _fee(1 ether), "node2 paid its voucher");
        assertEq(escrow.balanceOf(client), 96 ether, "charged both");
    }

    function test_RoutePairLanesKeepTheirOwnTotals() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _routePair(CLIENT_PK, 9, 3 ether, 5 ether);
        settlement.settle(nodes, groups);
        // node's 4 ether is below node2's lane but above its own: it pays the 1 ether rise
        (nodes, groups) = _routePair(CLIENT_PK, 9, 4 ether, 6 ether);
        assertEq(settlement.settle(nodes, groups), 2 ether, "rises only");
        assertEq(settlement.paid(client, node, node2, 9), 4 ether, "node's lane");
        assertEq(settlement.paid(client, node2, node, 9), 6 ether, "node2's lane");
        assertEq(settlement.settle(nodes, groups), 0, "replay skipped");
    }

    function test_RoutePairIsApartFromSelfPairs() public {
        // the same client, nodes and ids through the other kind of slot: neither reaches the other's lanes
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _routePair(CLIENT_PK, 8, 3 ether, 1 ether);
        settlement.settle(nodes, groups);
        _settleOne(CLIENT_PK, node, 8, 2 ether);
        _settleOne(CLIENT_PK, node, 9, 2 ether);
        assertEq(settlement.paid(client, node, node2, 8), 3 ether, "route lane kept");
        assertEq(settlement.paid(client, node2, node, 8), 1 ether, "route lane kept");
        assertEq(settlement.paid(client, node, node, 8), 2 ether, "self lane 0");
        assertEq(settlement.paid(client, node, node, 9), 2 ether, "self lane 1");
        assertEq(escrow.balanceOf(client), 92 ether, "every voucher charged once");
    }

    function test_RevertWhen_PartnerSwappedBySubmitter() public {
        // signed naming node2 as partner; a submitter that points the partner index at another node breaks the
        // signature (the partner is signed), so it cannot move the voucher into another slot
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _routePair(CLIENT_PK, 9, 3 ether, 1 ether);
        address[] memory three = new address[](3);
        (three[0], three[1], three[2]) = (node, node2, address(0xBEEF));
        groups[0].vouchers[1].packed = _packPair(1, 2, 9, 1 ether);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 1));
        settlement.settle(three, groups);
        groups[0].vouchers[1].packed = _packPair(1, 1, 9, 1 ether); // partner = the node itself: also unsigned
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidSignature.selector, 1));
        settlement.settle(nodes, groups);
    }

    function test_RevertWhen_PartnerIndexOutOfRange() public {
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) = _routePair(CLIENT_PK, 9, 3 ether, 1 ether);
        groups[0].vouchers[1].packed = _packPair(1, 2, 9, 1 ether);
        vm.expectRevert(abi.encodeWithSelector(Settlement.BadNodeIndex.selector, 1));
        settlement.settle(nodes, groups);
    }

    function testFuzz_RoutePairFullLanes(uint64 channelId, uint256 a, uint256 b, bool swapOrder) public {
        a = bound(a, 1, MAX128 / 2);
        b = bound(b, 1, MAX128 / 2);
        _deposit(client2, MAX128 - 100 ether);
        (address[] memory nodes, Settlement.ClientVouchers[] memory groups) =
            _routePair(CLIENT2_PK, channelId, uint128(a), uint128(b));
        if (swapOrder) (groups[0].vouchers[0], groups[0].vouchers[1]) = (groups[0].vouchers[1], groups[0].vouchers[0]);
        assertEq(settlement.settle(nodes, groups), a + b, "gross");
        assertEq(settlement.paid(client2, node, node2, channelId), a, "node's lane");
        assertEq(settlement.paid(client2, node2, node, channelId), b, "node2's lane");
    }
}
