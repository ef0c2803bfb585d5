// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Escrow} from "./Escrow.sol";
import {NectarTypes, Receipt} from "./lib/NectarTypes.sol";

/// @notice The credits vault (Escrow: deposits, delayed withdrawals, earnings) with batch settlement of EIP-712
///         cumulative vouchers (client -> node, per channel) and the per-epoch Merkle roots of receipts. Anyone may
///         submit a batch: the ledger normally, a node itself when the ledger is down. Its EIP-712 domain
///         {name: "Nectar", version: "1"} is the one receipts and vouchers are signed under.
/// @dev Calldata is grouped for gas: a batch lists its node addresses once, then one group per client; each voucher
///      is three words: `packed = nodeIndex << 224 | partnerIndex << 192 | channelId << 128 | cumulativeAmount`
///      and an EIP-2098 compact signature (r, vs). Each client's escrow and each node's earnings are written once per
///      batch, and two channels share each storage slot (see `_channelPairs`).
///      A voucher that cannot be paid for reasons outside the submitter's control is skipped, not reverted: one whose
///      channel is already paid at or above its amount (replayed, or copied out of a pending batch and settled first:
///      a front-run) and one the client's escrow no longer covers (drained meanwhile). Each skip emits
///      `VoucherSkipped` with the voucher's batch position and why; the rest of the batch settles. A malformed voucher
///      (bad signature or node index: the submitter's own mistake) still reverts the batch with its position.
/// @author Nectar
contract Settlement is Escrow, EIP712 {
    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when voucher `index` is not signed by its group's client (or the signature is malformed).
    error InvalidSignature(uint256 index);

    /// @dev Fires when voucher `index` names a node position outside the batch's node list.
    error BadNodeIndex(uint256 index);

    /// @dev Fires when a batch holds no voucher.
    error EmptyBatch();

    /// @dev Fires when a caller that is not a registered root committer commits an epoch root.
    error NotRootCommitter();

    /// @dev Fires when an epoch's root is committed twice (use `correctEpochRoot` within the challenge period).
    error EpochAlreadyCommitted(uint64 epoch);

    /// @dev Fires when `epoch` is not the next one (`latestEpoch + 1`): epochs are committed in order, empty ones too.
    error EpochOutOfOrder(uint64 epoch, uint64 expected);

    /// @dev Fires when a root of zero counts receipts, or a non-zero root counts none (an empty epoch is (0, 0)).
    error EmptyRoot();

    /// @dev Fires when a root is corrected that was never committed.
    error EpochNotCommitted(uint64 epoch);

    /// @dev Fires when a root is corrected after its challenge period: it is final.
    error EpochRootFinal(uint64 epoch, uint256 finalAt);

    /// @dev Fires when the constructor gets a challenge period above `MAX_CHALLENGE_PERIOD`.
    error BadChallengePeriod();

    /// @dev Fires when the owner sets a fee above `MAX_FEE_BPS` or a zero fee recipient.
    error BadFee();

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted per batch: `vouchers` counts all the batch's vouchers, skipped ones included. Per-voucher detail
    ///      is the transaction's calldata minus the `VoucherSkipped` ones, and `paid(client, node, partner, channelId)`
    ///      gives the settled total of any channel.
    event BatchSettled(address indexed submitter, uint256 vouchers, uint256 gross, uint256 fee);

    /// @dev Emitted when voucher `index` (position in the whole batch) of `client` to `node` on `channelId` is not
    ///      paid: `reason` is `SKIP_ALREADY_SETTLED` (its channel is already paid at or above its amount: a replay or
    ///      a front-run), `SKIP_INSUFFICIENT_ESCROW` (the client's free escrow does not cover its rise and holds no
    ///      reserve for the node: nothing paid) or `SKIP_PARTLY_PAID` (free escrow plus the node's reserve covered only
    ///      part of its rise: that part was paid, the reserve is empty).
    event VoucherSkipped(
        address indexed client, address indexed node, uint64 indexed channelId, uint256 index, uint8 reason
    );

    /// @dev Emitted when `committer` records the receipts Merkle `root` of `epoch`, covering `count` receipts.
    event EpochRootCommitted(uint64 indexed epoch, bytes32 root, uint32 count, address indexed committer);

    /// @dev Emitted when `committer` replaces `epoch`'s root `previous` within its challenge period.
    event EpochRootCorrected(
        uint64 indexed epoch, bytes32 previous, bytes32 root, uint32 count, address indexed committer
    );

    /// @dev Emitted when the owner changes the protocol fee.
    event FeeUpdated(address indexed recipient, uint16 feeBps);

    /// @dev Emitted when the owner grants or revokes the right to commit epoch roots.
    event RootCommitterUpdated(address indexed committer, bool allowed);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    /// @dev One voucher inside a client group (see the contract's @dev for `packed`).
    struct SignedVoucher {
        uint256 packed;
        bytes32 r;
        bytes32 vs;
    }

    /// @dev The vouchers signed by one client.
    struct ClientVouchers {
        address client;
        SignedVoucher[] vouchers;
    }

    struct EpochRoot {
        bytes32 root;
        uint32 count;
        uint64 committedAt; // first commit: corrections do not move the end of the challenge period
    }

    uint16 public constant MAX_FEE_BPS = 1_000;

    /// @notice `VoucherSkipped` reason: the channel is already paid at or above the voucher's amount.
    uint8 public constant SKIP_ALREADY_SETTLED = 1;

    /// @notice `VoucherSkipped` reason: the client's free escrow does not cover the voucher's rise and it holds no
    ///         reserve for the voucher's node: nothing of the rise is paid.
    uint8 public constant SKIP_INSUFFICIENT_ESCROW = 2;

    /// @notice `VoucherSkipped` reason: the client's free escrow plus its reserve for the node covered only part of
    ///         the voucher's rise; that part is paid (the channel's paid total rose by it) and the rest is not.
    uint8 public constant SKIP_PARTLY_PAID = 3;

    // `settle` lays memory out by hand from 0x80 (nothing is live there when it starts) and moves the free memory
    // pointer past it, so the voucher loop reads and writes fixed addresses (one PUSH instead of DUP + ADD each):
    //   0x080 typehash | 0x0a0 client | 0x0c0 node | 0x0e0 partner | 0x100 channelId | 0x120 cumulative
    //       (hashStruct input; then 0x0a0..0x120 is the slot key's abi.encode(client, lo, hi, k))
    //   0x140 0x1901 (its last 2 bytes start the digest preimage at 0x15e) | 0x160 domain | 0x180 structHash
    //   0x1a0 digest | 0x1c0 v | 0x1e0 r | 0x200 s (ecrecover input)
    //   0x220 the client's available escrow | 0x240 batch position of the group's first voucher
    //   0x260 nodes.offset | 0x280 nodes.length | 0x2a0 nodeGross (memory pointer)
    //   0x2c0 credits drawn from reserves in this batch (they are in nodeGross but not in the groups' `spent`)
    // Scratch 0x00 takes the recovered signer, then the slot key; 0x20 holds the mapping's slot during a loop.
    uint256 private constant _SCRATCH_END = 0x2e0;

    /// @notice Receives the protocol fee as escrow earnings.
    address public feeRecipient;

    /// @notice Protocol fee in basis points of each settled amount.
    uint16 public feeBps;

    mapping(address => bool) public isRootCommitter;

    /// @dev Paid totals of channel pairs, two 128-bit lanes per slot, `lane1 << 128 | lane0` (Permit2-style
    ///      packing): a client's channels to the two nodes of a pair (voucher `partner` = the other node), or its
    ///      channels 2k and 2k + 1 to one node (`partner` = the node). Settling both lanes in one batch costs one
    ///      cold slot write instead of two (~2,400 gas less per voucher). The key holds the client and both nodes
    ///      and the signed voucher names its partner, so only that client's vouchers for that node and partner can
    ///      touch a lane. NectarTypes.channelSlot(client, node, partner, channelId) => (key, lane offset).
    mapping(bytes32 slotKey => uint256 lanes) internal _channelPairs;

    mapping(uint64 epoch => EpochRoot) internal _epochs;

    /// @notice The last committed epoch (0: none yet); the next commit must be `latestEpoch + 1`.
    uint64 public latestEpoch;

    /// @notice Longest challenge period accepted.
    uint256 public constant MAX_CHALLENGE_PERIOD = 30 days;

    /// @notice Seconds after an epoch's first commit during which its committer may correct the root; after that the
    ///         root is final, and only final roots can back a spot-check case (Slashing).
    uint256 public immutable challengePeriod;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param credits_ The Credits token held in escrow.
    /// @param unlockDelay_ Seconds between a client's withdrawal request and the withdrawal.
    /// @param owner_ Sets fees and root committers.
    /// @param feeRecipient_ Receives the protocol fee as escrow earnings.
    /// @param feeBps_ Protocol fee in basis points, at most `MAX_FEE_BPS`.
    /// @param challengePeriod_ Seconds an epoch root stays correctable (at most `MAX_CHALLENGE_PERIOD`).
    constructor(
        IERC20 credits_,
        uint256 unlockDelay_,
        address owner_,
        address feeRecipient_,
        uint16 feeBps_,
        uint256 challengePeriod_
    ) Escrow(credits_, unlockDelay_, owner_) EIP712("Nectar", "1") {
        _setFee(feeRecipient_, feeBps_);
        if (challengePeriod_ > MAX_CHALLENGE_PERIOD) revert BadChallengePeriod();
        challengePeriod = challengePeriod_;
    }

    /*//////////////////////////////////////////////////////////////
                                INTERNAL
    //////////////////////////////////////////////////////////////*/

    function _setFee(address recipient, uint16 bps) internal {
        if (bps > MAX_FEE_BPS || recipient == address(0)) revert BadFee();
        feeRecipient = recipient;
        feeBps = bps;
        emit FeeUpdated(recipient, bps);
    }

    /// @dev Settles the `vouchers` of the client at 0x0a0 (escrow at 0x220, see the layout above): for each, in
    ///      order, what this Solidity would do:
    ///
    ///          address node = nodes[packed >> 224];                  // clean address, else BadNodeIndex
    ///          address partner = nodes[packed >> 192 & 0xffffffff];  // the same
    ///          bytes32 digest = _hashTypedDataV4(NectarTypes.hashVoucher(client, node, partner, channelId, cumulative));
    ///          require(ecrecover(digest, 27 + (vs >> 255), r, s) == client && s <= n / 2);  // InvalidSignature
    ///          (bytes32 key, uint256 shift) = NectarTypes.channelSlot(client, node, partner, channelId);
    ///          uint256 paid_ = uint128(_channelPairs[key] >> shift);  // this channel's lane
    ///          if (cumulative <= paid_) { emit VoucherSkipped(.., SKIP_ALREADY_SETTLED); continue; }
    ///          uint256 delta = cumulative - paid_;
    ///          if (spent + delta > available) {                     // free balance short: the node's reserve
    ///              uint256 free = available - spent;
    ///              uint256 reserved = _reserves[client][node].amount;
    ///              if (delta > free + reserved && reserved == 0) { emit VoucherSkipped(.., SKIP_INSUFFICIENT_ESCROW); continue; }
    ///              if (delta > free + reserved) { delta = free + reserved; emit VoucherSkipped(.., SKIP_PARTLY_PAID); }
    ///              _reserves[client][node].amount -= delta - free;  // emit ReserveDrawn when nonzero
    ///              reserveDrawn += delta - free; spent = available - delta;  // so the line below ends at available
    ///          }
    ///          spent += delta;
    ///          _channelPairs[key] += delta << shift;                // the other lane kept
    ///          nodeGross[nodeIndex] += delta;
    ///
    ///      It is assembly because it is the whole cost of a batch beyond the fixed costs (ecrecover, 3,100 gas, and
    ///      the slot: 5,000 for the first lane a batch writes, 200 for the second): that Solidity spent ~1,200 gas
    ///      more per voucher on call plumbing and checks (see the .gas-snapshot history in benchmarks/gas). A malformed
    ///      voucher reverts the batch with its position; a replayed, front-run or uncovered one is skipped. The
    ///      reserve branch runs only when the free balance falls short, so the common path costs what it did.
    ///      No overflow: each delta is below 2^128 and a batch has far fewer than 2^128 vouchers.
    function _settleVouchers(SignedVoucher[] calldata vouchers) internal returns (uint256 spent) {
        assembly {
            // VoucherSkipped(client, node, channelId, index, reason); scratch 0x20 is restored to the mapping's slot.
            // The topic is keccak256("VoucherSkipped(address,address,uint64,uint256,uint8)"), checked by a test.
            function skip(node, channelId, reason, v, first) {
                mstore(0x00, add(mload(0x240), div(sub(v, first), 0x60)))
                mstore(0x20, reason)
                log4(
                    0x00,
                    0x40,
                    0xd0231760691260350b9973d2b8d1bccb1f59ca9ea569ef22a368dd24e7e930bf,
                    mload(0xa0),
                    node,
                    channelId
                )
                mstore(0x20, _channelPairs.slot)
            }
            function fail(selector, v, first) {
                mstore(0x00, shl(224, selector))
                mstore(0x04, add(mload(0x240), div(sub(v, first), 0x60)))
                revert(0x00, 0x24)
            }
            // The free balance falls short of `delta`: the rest comes from the client's reserve for `node`, as far
            // as it goes (a partial payment raises the lane by what was paid; a later voucher pays the rest).
            // Returns the amount to pay (0: skipped) and `spent` lowered by what the reserve pays, so that the
            // loop's `spent := add(spent, delta)` ends at the whole free balance (it may wrap below zero here).
            function fromReserve(node, channelId, delta, used, v, first) -> pay, spentOut {
                let free := sub(mload(0x220), used)
                mstore(0x00, mload(0xa0))
                mstore(0x20, _reserves.slot)
                mstore(0x20, keccak256(0x00, 0x40))
                mstore(0x00, node)
                let reserveSlot := keccak256(0x00, 0x40) // _reserves[client][node]
                mstore(0x20, _channelPairs.slot)
                let held := sload(reserveSlot)
                let reserved := and(held, 0xffffffffffffffffffffffffffffffff) // ReserveAccount.amount
                pay := delta
                if gt(delta, add(free, reserved)) {
                    // without a reserve nothing is paid, as before reserves: a node that took no reserve relied
                    // on nothing; with one, the reserved node gets all that is left for it
                    pay := mul(add(free, reserved), gt(reserved, 0))
                    switch pay
                    case 0 { skip(node, channelId, SKIP_INSUFFICIENT_ESCROW, v, first) }
                    default { skip(node, channelId, SKIP_PARTLY_PAID, v, first) }
                }
                spentOut := used
                if iszero(pay) { leave }
                let draw := sub(pay, free) // pay > free: the free balance alone fell short
                spentOut := sub(used, draw)
                sstore(reserveSlot, sub(held, draw)) // draw <= reserved: the pending field is kept
                mstore(0x2c0, add(mload(0x2c0), draw))
                // ReserveDrawn(client, node, draw, reserved - draw); topic checked by a test
                mstore(0x00, draw)
                mstore(0x20, sub(reserved, draw))
                log3(0x00, 0x40, 0xed6e45be144100498010e002bc1bb1d47715201c5ae9e075dc7f8686e7924383, mload(0xa0), node)
                mstore(0x20, _channelPairs.slot)
            }
            mstore(0x20, _channelPairs.slot) // word 2 of every slot-key hash below
            let nodesAt := mload(0x260)
            let nodeCount := mload(0x280)
            let first := vouchers.offset // Solidity checked the array lies inside calldata
            for { let v := first } lt(v, add(first, mul(vouchers.length, 0x60))) { v := add(v, 0x60) } {
                let node := shr(224, calldataload(v))
                let partner := and(shr(192, calldataload(v)), 0xffffffff)
                if iszero(and(lt(node, nodeCount), lt(partner, nodeCount))) { fail(0x11413f72, v, first) }
                node := calldataload(add(nodesAt, shl(5, node)))
                partner := calldataload(add(nodesAt, shl(5, partner)))
                if or(or(iszero(node), iszero(partner)), shr(160, or(node, partner))) { fail(0x11413f72, v, first) }
                mstore(0xc0, node)
                mstore(0xe0, partner)
                let channelId := and(shr(128, calldataload(v)), 0xffffffffffffffff)
                mstore(0x100, channelId)
                mstore(0x120, and(calldataload(v), 0xffffffffffffffffffffffffffffffff)) // cumulative
                mstore(0x180, keccak256(0x80, 0xc0)) // structHash
                mstore(0x1a0, keccak256(0x15e, 0x42)) // digest
                // signer == client, with s = low 255 bits of vs, s <= n/2 (EIP-2), v = 27 + top bit of vs
                {
                    let vs := calldataload(add(v, 0x40))
                    let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
                    if gt(s, 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0) {
                        fail(0x52bf9848, v, first)
                    }
                    mstore(0x1c0, add(shr(255, vs), 27))
                    mstore(0x1e0, calldataload(add(v, 0x20)))
                    mstore(0x200, s)
                    mstore(0x00, 0) // the precompile returns nothing when recovery fails
                    pop(staticcall(gas(), 0x01, 0x1a0, 0x80, 0x00, 0x20))
                    if iszero(eq(mload(0x00), mload(0xa0))) { fail(0x52bf9848, v, first) }
                }
                // The slot key (NectarTypes.channelSlot) over words 0x0a0..0x120 as hashed: a self pair rewrites
                // the channel word, a route pair whose node is the higher address swaps the two nodes.
                let shift := 0
                switch eq(node, partner)
                case 1 {
                    shift := shl(7, and(channelId, 1))
                    mstore(0x100, shr(1, channelId))
                }
                default {
                    if gt(node, partner) {
                        mstore(0xc0, partner)
                        mstore(0xe0, node)
                        shift := 128
                    }
                }
                mstore(0x00, keccak256(0xa0, 0x80))
                let slot := keccak256(0x00, 0x40) // 0x20: the mapping's slot
                let lanes := sload(slot)
                let delta := sub(mload(0x120), and(shr(shift, lanes), 0xffffffffffffffffffffffffffffffff))
                // the lane must rise: a cumulative at or below it (replay, front-run) wraps the subtraction past 2^128
                if or(iszero(delta), shr(128, delta)) {
                    skip(node, channelId, SKIP_ALREADY_SETTLED, v, first)
                    continue
                }
                if gt(add(spent, delta), mload(0x220)) {
                    delta, spent := fromReserve(node, channelId, delta, spent, v, first)
                    if iszero(delta) { continue }
                }
                spent := add(spent, delta)
                // cumulative < 2^128 and above this lane's value: adding the rise in place leaves the other lane
                sstore(slot, add(lanes, shl(shift, delta)))
                let cell := add(add(mload(0x2a0), 0x20), shl(5, shr(224, calldataload(v))))
                mstore(cell, add(mload(cell), delta))
            }
        }
    }

    /// @dev Charges one client's group: its vouchers' rises come out of its escrow balance (one read and one write
    ///      per group). `index` is the batch position of the group's first voucher, for error reporting.
    function _settleClient(ClientVouchers calldata group, uint256 index) internal returns (uint256 spent) {
        address client = group.client;
        if (client == address(0)) revert InvalidSignature(index);
        ClientAccount storage account = _clients[client];
        uint256 available = account.balance;
        assembly {
            mstore(0xa0, client)
            mstore(0x220, available)
            mstore(0x240, index)
        }
        spent = _settleVouchers(group.vouchers);
        unchecked {
            available -= spent; // the loop kept spent <= available
        }
        // forge-lint: disable-next-line(unsafe-typecast) -- at most the uint128 it was read from
        account.balance = uint128(available);
        emit Charged(client, spent, available);
    }

    /// @dev Credits each paid node its gross minus the protocol fee, then the summed fee to the fee recipient.
    function _creditNodes(address[] calldata nodes, uint256[] memory nodeGross) internal returns (uint256 fee) {
        uint256 bps = feeBps;
        for (uint256 n; n < nodes.length; ++n) {
            uint256 gross = nodeGross[n];
            if (gross == 0) continue; // a partner listed only for its address
            uint256 nodeFee = gross * bps / 10_000;
            fee += nodeFee;
            _credit(nodes[n], gross - nodeFee);
        }
        _credit(feeRecipient, fee);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Settles a batch of vouchers: pays each channel's new cumulative amount minus what it was already
    ///         paid, from the client's escrow to the node's escrow earnings, minus the protocol fee.
    /// @dev Skips (with `VoucherSkipped`) vouchers already paid or not covered by escrow, and settles the rest. A voucher
    ///      the client's free escrow does not cover is paid from the client's reserve for its node, as far as that goes.
    ///      Reverts (naming the voucher's batch position) with `InvalidSignature` or `BadNodeIndex`, and with
    ///      `EmptyBatch` if the batch holds no voucher.
    /// @param nodes The batch's node addresses, referenced by index from each voucher.
    /// @param groups One group per client.
    /// @return gross Total credits moved out of client escrow (free balances and reserves).
    function settle(address[] calldata nodes, ClientVouchers[] calldata groups) external returns (uint256 gross) {
        assembly {
            mstore(0x40, _SCRATCH_END) // reserve [0x80, _SCRATCH_END): nothing in memory is live yet
        }
        bytes32 domain = _domainSeparatorV4();
        bytes32 typehash = NectarTypes.VOUCHER_TYPEHASH;
        uint256[] memory nodeGross = new uint256[](nodes.length);
        assembly {
            mstore(0x80, typehash)
            mstore(0x140, 0x1901)
            mstore(0x160, domain)
            mstore(0x260, nodes.offset)
            mstore(0x280, nodes.length)
            mstore(0x2a0, nodeGross)
            mstore(0x2c0, 0)
        }
        uint256 index;
        for (uint256 g; g < groups.length; ++g) {
            ClientVouchers calldata group = groups[g];
            gross += _settleClient(group, index);
            index += group.vouchers.length;
        }
        if (index == 0) revert EmptyBatch();
        assembly {
            gross := add(gross, mload(0x2c0)) // what reserves paid
        }
        uint256 fee;
        if (gross != 0) fee = _creditNodes(nodes, nodeGross); // all skipped: nothing to credit
        emit BatchSettled(msg.sender, index, gross, fee);
    }

    /// @notice Records the receipts Merkle root of `epoch` (sorted-pair tree, see docs/protocol.md), once, in order:
    ///         `epoch` must be `latestEpoch + 1`, so no one can claim a far epoch number ahead of time. An epoch
    ///         without receipts (vouchers only) is committed as (0, 0) so the next one can follow.
    /// @dev Root committers only (`NotRootCommitter`); reverts with `EpochAlreadyCommitted`, `EpochOutOfOrder` or
    ///      `EmptyRoot`.
    function commitEpochRoot(uint64 epoch, bytes32 root, uint32 count) external {
        if (!isRootCommitter[msg.sender]) revert NotRootCommitter();
        if ((root == bytes32(0)) != (count == 0)) revert EmptyRoot();
        uint64 latest = latestEpoch;
        if (epoch != 0 && epoch <= latest) revert EpochAlreadyCommitted(epoch);
        if (epoch != latest + 1) revert EpochOutOfOrder(epoch, latest + 1);
        latestEpoch = epoch;
        // forge-lint: disable-next-line(unsafe-typecast) -- timestamps fit 64 bits
        _epochs[epoch] = EpochRoot(root, count, uint64(block.timestamp));
        emit EpochRootCommitted(epoch, root, count, msg.sender);
    }

    /// @notice Replaces the root of a committed `epoch` before its challenge period ends (a ledger that committed a
    ///         wrong tree fixes it). The period still ends `challengePeriod` after the first commit, so corrections
    ///         cannot hold a root open forever. Spot-check cases only cite final roots, so no case rests on a root
    ///         that can still change.
    /// @dev Root committers only (`NotRootCommitter`); reverts with `EpochNotCommitted`, `EpochRootFinal` or
    ///      `EmptyRoot`.
    function correctEpochRoot(uint64 epoch, bytes32 root, uint32 count) external {
        if (!isRootCommitter[msg.sender]) revert NotRootCommitter();
        if ((root == bytes32(0)) != (count == 0)) revert EmptyRoot();
        EpochRoot storage e = _epochs[epoch];
        if (e.committedAt == 0) revert EpochNotCommitted(epoch);
        uint256 finalAt = uint256(e.committedAt) + challengePeriod;
        // forge-lint: disable-next-line(block-timestamp) -- challenge periods are hours, far above validator skew
        if (block.timestamp >= finalAt) revert EpochRootFinal(epoch, finalAt);
        emit EpochRootCorrected(epoch, e.root, root, count, msg.sender);
        e.root = root;
        e.count = count;
    }

    /// @notice Sets the protocol fee (at most `MAX_FEE_BPS`) and its recipient.
    /// @dev Owner only; reverts with `BadFee`.
    function setFee(address recipient, uint16 bps) external onlyOwner {
        _setFee(recipient, bps);
    }

    /// @notice Grants or revokes the right to commit epoch roots (the ledger's account).
    /// @dev Owner only.
    function setRootCommitter(address committer, bool allowed) external onlyOwner {
        isRootCommitter[committer] = allowed;
        emit RootCommitterUpdated(committer, allowed);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC READS
    //////////////////////////////////////////////////////////////*/

    /// @notice Cumulative amount already settled on channel (client, node, partner, channelId); `partner` is the
    ///         node itself for a channel that shares its slot with the same node's channel `channelId ^ 1`.
    function paid(address client, address node, address partner, uint64 channelId) external view returns (uint256) {
        (bytes32 key, uint256 shift) = NectarTypes.channelSlot(client, node, partner, channelId);
        // forge-lint: disable-next-line(unsafe-typecast) -- keeps the low 128 bits: the lane
        return uint128(_channelPairs[key] >> shift);
    }

    /// @notice The committed root of `epoch`, its receipt count and first commit time (zeros if none; an empty epoch
    ///         has a zero root and count and a commit time).
    function epochRoot(uint64 epoch) external view returns (bytes32 root, uint32 count, uint64 committedAt) {
        EpochRoot storage e = _epochs[epoch];
        return (e.root, e.count, e.committedAt);
    }

    /// @notice When `epoch`'s root becomes final (no longer correctable); 0 if it was never committed.
    function epochFinalAt(uint64 epoch) external view returns (uint256) {
        uint64 at = _epochs[epoch].committedAt;
        return at == 0 ? 0 : uint256(at) + challengePeriod;
    }

    /// @notice True when the receipt whose EIP-712 struct hash is `receiptHash` (see `receiptHash`) is in `epoch`'s
    ///         committed tree.
    /// @dev Takes the struct hash, not the leaf, and hashes it into the leaf `keccak256(receiptHash)` itself: a leaf is
    ///      the hash of 32 bytes and an inner node the hash of 64, so no inner node can pass for a leaf (a caller
    ///      handing in a leaf directly could offer an inner node with the rest of its proof).
    function verifyInclusion(uint64 epoch, bytes32 receiptHash, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        bytes32 root = _epochs[epoch].root;
        return root != bytes32(0) && MerkleProof.verifyCalldata(proof, root, keccak256(abi.encode(receiptHash)));
    }

    /// @notice The EIP-712 domain separator shared by vouchers and receipts.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The EIP-712 digest a client signs for a voucher.
    function voucherDigest(address client, address node, address partner, uint64 channelId, uint128 cumulativeAmount)
        external
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(NectarTypes.hashVoucher(client, node, partner, channelId, cumulativeAmount));
    }

    /// @notice The EIP-712 digest a node signs for a receipt.
    function receiptDigest(Receipt calldata receipt) external view returns (bytes32) {
        return _hashTypedDataV4(NectarTypes.hash(receipt));
    }

    /// @notice The EIP-712 struct hash of a receipt, hashStruct(receipt): what `verifyInclusion` takes.
    function receiptHash(Receipt calldata receipt) external pure returns (bytes32) {
        return NectarTypes.hash(receipt);
    }

    /// @notice The Merkle leaf of a receipt: keccak256(hashStruct(receipt)).
    function receiptLeaf(Receipt calldata receipt) external pure returns (bytes32) {
        return keccak256(abi.encode(NectarTypes.hash(receipt)));
    }
}
