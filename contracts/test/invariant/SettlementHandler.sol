// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Vm} from "../utils/Vm.sol";
import {Credits} from "../../src/Credits.sol";
import {Escrow} from "../../src/Escrow.sol";
import {Settlement} from "../../src/Settlement.sol";

/// @notice Drives Escrow and Settlement with random deposits, withdrawals, per-node reserves (fund, release),
///         settlements (within free balance + reserve, and over-committed ones that pay only part) and replays of
///         settled vouchers, for the invariant tests, keeping ghost totals to check against.
/// @author Nectar
contract SettlementHandler {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    Credits public immutable credits;
    Escrow public immutable escrow;
    Settlement public immutable settlement;
    address public immutable owner;

    uint256[3] internal clientKeys = [uint256(0xC1), 0xC2, 0xC3];
    address[3] public clients;
    address[3] public nodes;
    address public treasury;

    // Ghosts
    uint256 public ghostDeposited;
    uint256 public ghostWithdrawn;
    uint256 public ghostSettled;
    uint256 public ghostEarningsWithdrawn;
    uint256 public ghostReplayPaid; // replays that went through: must stay zero
    mapping(bytes32 => uint256) public ghostCumulative; // last cumulative settled per channel
    bytes32[] public channelKeys;
    mapping(bytes32 => bool) internal _knownChannel;

    // The last settled voucher, replayed by `replay`.
    address[] internal _lastNodes;
    Settlement.ClientVouchers[] internal _lastGroups;
    bool internal _hasLast;

    constructor(Credits credits_, Escrow escrow_, Settlement settlement_, address owner_, address treasury_) {
        credits = credits_;
        escrow = escrow_;
        settlement = settlement_;
        owner = owner_;
        treasury = treasury_;
        for (uint256 i; i < 3; ++i) {
            clients[i] = vm.addr(clientKeys[i]);
            nodes[i] = address(uint160(0xD0 + i));
        }
    }

    function _bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        if (max - min == type(uint256).max) return x; // the full range: max - min + 1 would overflow
        return min + (x % (max - min + 1));
    }

    function channelCount() external view returns (uint256) {
        return channelKeys.length;
    }

    /*//////////////////////////////////////////////////////////////
                                 ACTIONS
    //////////////////////////////////////////////////////////////*/

    function deposit(uint256 who, uint256 amount) external {
        address c = clients[who % 3];
        amount = _bound(amount, 1, 1_000 ether);
        vm.prank(owner);
        credits.mint(c, amount);
        vm.startPrank(c);
        credits.approve(address(escrow), amount);
        escrow.deposit(amount);
        vm.stopPrank();
        ghostDeposited += amount;
    }

    function requestWithdrawal(uint256 who, uint256 amount) external {
        address c = clients[who % 3];
        uint256 balance = escrow.balanceOf(c);
        if (balance == 0) return;
        vm.prank(c);
        escrow.requestWithdrawal(_bound(amount, 1, balance));
    }

    function withdraw(uint256 who) external {
        address c = clients[who % 3];
        (uint256 pending, uint256 at) = escrow.pendingWithdrawal(c);
        if (pending == 0) return;
        if (block.timestamp < at) vm.warp(at);
        vm.prank(c);
        ghostWithdrawn += escrow.withdraw();
    }

    /// @dev What settlement can pay client `c`'s vouchers to `n`: its free balance and its reserve for `n`.
    function _available(address c, address n) internal view returns (uint256) {
        (uint256 reserved,,) = escrow.reserveOf(c, n);
        return escrow.balanceOf(c) + reserved;
    }

    function reserve(uint256 who, uint256 to, uint256 amount) external {
        address c = clients[who % 3];
        uint256 balance = escrow.balanceOf(c);
        if (balance == 0) return;
        vm.prank(c);
        escrow.reserve(nodes[to % 3], _bound(amount, 1, balance));
    }

    function requestRelease(uint256 who, uint256 to, uint256 amount) external {
        address c = clients[who % 3];
        address n = nodes[to % 3];
        (uint256 reserved,,) = escrow.reserveOf(c, n);
        if (reserved == 0) return;
        vm.prank(c);
        escrow.requestReserveRelease(n, _bound(amount, 1, reserved));
    }

    function release(uint256 who, uint256 to) external {
        address c = clients[who % 3];
        address n = nodes[to % 3];
        (, uint256 pending, uint256 at) = escrow.reserveOf(c, n);
        if (pending == 0) return;
        if (block.timestamp < at) vm.warp(at);
        vm.prank(c);
        escrow.releaseReserve(n);
    }

    /// @dev A voucher above what the client holds for the node: with a reserve for it, the part free balance +
    ///      reserve cover is paid; without one, nothing.
    function overCommit(uint256 who, uint256 to, uint256 channel, uint256 extra) external {
        uint256 k = who % 3;
        address c = clients[k];
        address n = nodes[to % 3];
        (uint256 reserved,,) = escrow.reserveOf(c, n);
        uint256 available = escrow.balanceOf(c) + reserved;
        uint64 channelId = uint64(channel % 4);
        bytes32 key = keccak256(abi.encode(c, n, n, channelId));
        uint128 cumulative = uint128(ghostCumulative[key] + available + _bound(extra, 1, 1_000 ether));
        delete _lastNodes;
        delete _lastGroups;
        _lastNodes.push(n);
        Settlement.ClientVouchers storage group = _lastGroups.push();
        group.client = c;
        (bytes32 r, bytes32 vs) = vm.signCompact(clientKeys[k], settlement.voucherDigest(c, n, n, channelId, cumulative));
        group.vouchers.push(Settlement.SignedVoucher(uint256(channelId) << 128 | cumulative, r, vs));
        uint256 paid = settlement.settle(_lastNodes, _lastGroups);
        _hasLast = false; // a partly paid voucher may rightly pay again (the rest, after a top-up): not a replay
        require(paid == (reserved == 0 ? 0 : available), "over-committed voucher pays free + reserve, or nothing");
        ghostSettled += paid;
        ghostCumulative[key] += paid;
        if (!_knownChannel[key]) {
            _knownChannel[key] = true;
            channelKeys.push(key);
        }
    }

    function settle(uint256 who, uint256 to, uint256 channel, uint256 amount) external {
        uint256 k = who % 3;
        address c = clients[k];
        address n = nodes[to % 3];
        uint256 available = _available(c, n);
        if (available == 0) return;
        uint64 channelId = uint64(channel % 4);
        bytes32 key = keccak256(abi.encode(c, n, n, channelId));
        uint256 delta = _bound(amount, 1, available);
        uint128 cumulative = uint128(ghostCumulative[key] + delta);

        delete _lastNodes;
        delete _lastGroups;
        _lastNodes.push(n);
        Settlement.ClientVouchers storage group = _lastGroups.push();
        group.client = c;
        (bytes32 r, bytes32 vs) = vm.signCompact(clientKeys[k], settlement.voucherDigest(c, n, n, channelId, cumulative));
        group.vouchers.push(Settlement.SignedVoucher(uint256(channelId) << 128 | cumulative, r, vs));
        settlement.settle(_lastNodes, _lastGroups);
        _hasLast = true;

        ghostSettled += delta;
        ghostCumulative[key] = cumulative;
        if (!_knownChannel[key]) {
            _knownChannel[key] = true;
            channelKeys.push(key);
        }
    }

    /// @dev Settles both channels of one slot pair (2p, 2p + 1) of a (client, node) in one batch, in random order.
    function settlePair(uint256 who, uint256 to, uint256 pair, uint256 amount0, uint256 amount1) external {
        uint256 k = who % 3;
        address n = nodes[to % 3];
        uint256 available = _available(clients[k], n);
        if (available < 2) return;
        uint64 first = uint64(pair % 2) << 1 | uint64((pair >> 8) % 2); // the lane settled first varies too
        uint256 delta0 = _bound(amount0, 1, available / 2);
        uint256 delta1 = _bound(amount1, 1, available / 2);

        delete _lastNodes;
        delete _lastGroups;
        _lastNodes.push(n);
        _lastGroups.push().client = clients[k];
        _addVoucher(k, 0, 0, first, delta0);
        _addVoucher(k, 0, 0, first ^ 1, delta1);
        settlement.settle(_lastNodes, _lastGroups);
        _hasLast = true;
    }

    /// @dev Settles a client's channels to two different nodes that name each other as partners (two hops of a
    ///      route: one slot, a lane each), in random order, in one batch.
    function settleRoutePair(uint256 who, uint256 to, uint256 channel, uint256 amount0, uint256 amount1) external {
        uint256 k = who % 3;
        uint256 available = escrow.balanceOf(clients[k]);
        if (available < 2) return;
        uint64 channelId = uint64(channel % 4);
        delete _lastNodes;
        delete _lastGroups;
        _lastNodes.push(nodes[to % 3]);
        _lastNodes.push(nodes[(to % 3 + 1) % 3]); // not (to + 1) % 3: it overflowed at to = 2^256 - 1 (issue 20)
        _lastGroups.push().client = clients[k];
        uint256 first = (to >> 8) % 2;
        _addVoucher(k, first, 1 - first, channelId, _bound(amount0, 1, available / 2));
        _addVoucher(k, 1 - first, first, channelId, _bound(amount1, 1, available / 2));
        settlement.settle(_lastNodes, _lastGroups);
        _hasLast = true;
    }

    /// @dev Appends a voucher raising channel (client k, _lastNodes[ni], partner _lastNodes[pi], channelId) by
    ///      `delta` to the last group.
    function _addVoucher(uint256 k, uint256 ni, uint256 pi, uint64 channelId, uint256 delta) internal {
        bytes32 key = keccak256(abi.encode(clients[k], _lastNodes[ni], _lastNodes[pi], channelId));
        uint128 cumulative = uint128(ghostCumulative[key] + delta);
        bytes32 digest = settlement.voucherDigest(clients[k], _lastNodes[ni], _lastNodes[pi], channelId, cumulative);
        (bytes32 r, bytes32 vs) = vm.signCompact(clientKeys[k], digest);
        _lastGroups[0].vouchers.push(
            Settlement.SignedVoucher(ni << 224 | pi << 192 | uint256(channelId) << 128 | cumulative, r, vs)
        );
        ghostSettled += delta;
        ghostCumulative[key] = cumulative;
        if (!_knownChannel[key]) {
            _knownChannel[key] = true;
            channelKeys.push(key);
        }
    }

    /// @dev Resubmits the last settled batch; any success is a double payment.
    function replay() external {
        if (!_hasLast) return;
        try settlement.settle(_lastNodes, _lastGroups) returns (uint256 gross) {
            ghostReplayPaid += gross;
        } catch {}
    }

    function withdrawEarnings(uint256 who) external {
        address payee = who % 4 == 3 ? treasury : nodes[who % 4];
        if (escrow.earningsOf(payee) == 0) return;
        vm.prank(payee);
        ghostEarningsWithdrawn += escrow.withdrawEarnings();
    }

    function warp(uint256 seconds_) external {
        vm.warp(block.timestamp + _bound(seconds_, 1, 2 days));
    }
}
