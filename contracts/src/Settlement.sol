// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Escrow} from "./Escrow.sol";
import {NectarTypes, Receipt} from "./lib/NectarTypes.sol";

/// @notice Batch settlement of EIP-712 cumulative vouchers (client -> node, per channel) and the per-epoch Merkle
///         roots of receipts. Anyone may submit a batch: the ledger normally, a node itself when the ledger is down.
///         Its EIP-712 domain {name: "Nectar", version: "1"} is the one receipts and vouchers are signed under.
/// @dev Calldata is grouped for gas: a batch lists its node addresses once, then one group per client; each voucher
///      is three words: `packed = nodeIndex << 224 | partnerIndex << 192 | channelId << 128 | cumulativeAmount`
///      and an EIP-2098 compact signature (r, vs). Each client's escrow and each node's earnings are written once per
///      batch (in Escrow), and two channels share each storage slot (see `_channelPairs`).
///      A batch is all-or-nothing: an invalid voucher reverts it with its position, so the submitter can drop that
///      voucher and resubmit.
/// @author Nectar
contract Settlement is EIP712, Ownable {
    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when voucher `index` (position in the whole batch) does not raise its channel's paid amount.
    error VoucherReplay(uint256 index);

    /// @dev Fires when voucher `index` is not signed by its group's client (or the signature is malformed).
    error InvalidSignature(uint256 index);

    /// @dev Fires when voucher `index` would take the client's escrow below zero.
    error InsufficientEscrow(uint256 index);

    /// @dev Fires when voucher `index` names a node position outside the batch's node list.
    error BadNodeIndex(uint256 index);

    /// @dev Fires when a batch settles nothing.
    error EmptyBatch();

    /// @dev Fires when a caller that is not a registered root committer commits an epoch root.
    error NotRootCommitter();

    /// @dev Fires when an epoch's root is committed twice.
    error EpochAlreadyCommitted(uint64 epoch);

    /// @dev Fires when a committed root is zero or counts no receipts.
    error EmptyRoot();

    /// @dev Fires when the owner sets a fee above `MAX_FEE_BPS` or a zero fee recipient.
    error BadFee();

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted per batch. Per-voucher detail is the transaction's calldata (all-or-nothing), and
    ///      `paid(client, node, channelId)` gives the settled total of any channel.
    event BatchSettled(address indexed submitter, uint256 vouchers, uint256 gross, uint256 fee);

    /// @dev Emitted when `committer` records the receipts Merkle `root` of `epoch`, covering `count` receipts.
    event EpochRootCommitted(uint64 indexed epoch, bytes32 root, uint32 count, address indexed committer);

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
        uint64 committedAt;
    }

    uint16 public constant MAX_FEE_BPS = 1_000;

    // Failure codes of the per-voucher loop in `_settleClient`.
    uint256 private constant FAIL_NODE_INDEX = 1;
    uint256 private constant FAIL_SIGNATURE = 2;
    uint256 private constant FAIL_REPLAY = 3;
    uint256 private constant FAIL_ESCROW = 4;

    Escrow public immutable escrow;

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

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param escrow_ The vault whose client balances vouchers draw on (it must name this contract as settlement).
    /// @param owner_ Sets fees and root committers.
    /// @param feeRecipient_ Receives the protocol fee as escrow earnings.
    /// @param feeBps_ Protocol fee in basis points, at most `MAX_FEE_BPS`.
    constructor(Escrow escrow_, address owner_, address feeRecipient_, uint16 feeBps_)
        EIP712("Nectar", "1")
        Ownable(owner_)
    {
        escrow = escrow_;
        _setFee(feeRecipient_, feeBps_);
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

    /// @dev Settles `vouchers` of `client` (whose escrow holds `available`): for each, in order, what this
    ///      Solidity would do:
    ///
    ///          address node = nodes[packed >> 224];                  // clean address, else FAIL_NODE_INDEX
    ///          address partner = nodes[packed >> 192 & 0xffffffff];  // the same
    ///          bytes32 digest = _hashTypedDataV4(NectarTypes.hashVoucher(client, node, partner, channelId, cumulative));
    ///          require(ecrecover(digest, 27 + (vs >> 255), r, s) == client && s <= n / 2);  // FAIL_SIGNATURE
    ///          (bytes32 key, uint256 shift) = NectarTypes.channelSlot(client, node, partner, channelId);
    ///          uint256 paid_ = uint128(_channelPairs[key] >> shift);  // this channel's lane
    ///          require(cumulative > paid_);                           // FAIL_REPLAY
    ///          spent += cumulative - paid_; require(spent <= available);  // FAIL_ESCROW
    ///          _channelPairs[key] += (cumulative - paid_) << shift;     // the other lane kept
    ///          nodeGross[nodeIndex] += cumulative - paid_;
    ///
    ///      It is assembly because it is the whole cost of a batch beyond the two fixed costs (ecrecover, 3,100 gas,
    ///      and the pair's slot: 5,000 for the first lane a batch writes, 200 for the second): that Solidity spent
    ///      ~1,200 gas more per voucher on call plumbing and checks (see the .gas-snapshot history in benchmarks/gas).
    ///      It stops at the first bad voucher and returns the failure code and position; `_settleClient` turns them
    ///      into the custom error.
    ///      Memory: only the scratch words and the region past the free memory pointer, which it never allocates.
    ///      No overflow: each delta is below 2^128 and a batch has far fewer than 2^128 vouchers.
    function _settleVouchers(
        bytes32 domain,
        address client,
        uint256 available,
        SignedVoucher[] calldata vouchers,
        address[] calldata nodes,
        uint256[] memory nodeGross
    ) internal returns (uint256 spent, uint256 failure, uint256 failedAt) {
        bytes32 typehash = NectarTypes.VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            // Scratch layout from m: [0x000, 0x0c0) hashStruct input, whose words 1..4 then become the slot key's
            // abi.encode(client, lo, hi, k); [0x0e0, 0x122) "\x19\x01" ++ domain ++ structHash; [0x140, 0x1c0)
            // ecrecover input; [0x200, 0x2e0) inputs and results kept in memory, so the loop touches no Solidity
            // variable (they are out of the stack's reach). Scratch 0x00: the recovered signer, then the slot key;
            // 0x20: the mapping's slot, for the whole loop.
            let m := mload(0x40)
            mstore(m, typehash)
            mstore(add(m, 0x20), client)
            mstore(add(m, 0xe0), hex"1901")
            mstore(add(m, 0xe2), domain)
            mstore(add(m, 0x200), nodes.offset)
            mstore(add(m, 0x220), nodes.length)
            mstore(add(m, 0x240), add(nodeGross, 0x20)) // the array's first element
            mstore(add(m, 0x260), available)
            mstore(add(m, 0x2a0), 0) // spent
            mstore(add(m, 0x2c0), 0) // failure code << 128 | position
            let base := vouchers.offset // Solidity checked the array lies inside calldata
            mstore(0x20, _channelPairs.slot) // the mapping's slot: word 2 of every slot-key hash below
            let end := add(base, mul(vouchers.length, 0x60))
            for { let v := base } lt(v, end) { v := add(v, 0x60) } {
                // node = nodes[packed >> 224], partner = nodes[packed >> 192 & 0xffffffff]: both in range, both
                // nonzero clean addresses
                {
                    let count := mload(add(m, 0x220))
                    let nodeIndex := shr(224, calldataload(v))
                    let partnerIndex := and(shr(192, calldataload(v)), 0xffffffff)
                    if iszero(and(lt(nodeIndex, count), lt(partnerIndex, count))) {
                        mstore(add(m, 0x2c0), or(shl(128, 1), div(sub(v, base), 0x60)))
                        break
                    }
                    let node := calldataload(add(mload(add(m, 0x200)), shl(5, nodeIndex)))
                    let partner := calldataload(add(mload(add(m, 0x200)), shl(5, partnerIndex)))
                    if or(or(iszero(node), iszero(partner)), shr(160, or(node, partner))) {
                        mstore(add(m, 0x2c0), or(shl(128, 1), div(sub(v, base), 0x60)))
                        break
                    }
                    mstore(add(m, 0x40), node)
                    mstore(add(m, 0x60), partner)
                }
                mstore(add(m, 0x80), and(shr(128, calldataload(v)), 0xffffffffffffffff)) // channelId
                mstore(add(m, 0xa0), and(calldataload(v), 0xffffffffffffffffffffffffffffffff)) // cumulative
                mstore(add(m, 0x102), keccak256(m, 0xc0)) // structHash
                mstore(add(m, 0x140), keccak256(add(m, 0xe0), 0x42)) // digest
                // signer == client, with s = low 255 bits of vs, s <= n/2 (EIP-2), v = 27 + top bit of vs
                {
                    let vs := calldataload(add(v, 0x40))
                    let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
                    mstore(0x00, 0) // the precompile returns nothing when recovery fails
                    if iszero(gt(s, 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0)) {
                        mstore(add(m, 0x160), add(shr(255, vs), 27))
                        mstore(add(m, 0x180), calldataload(add(v, 0x20)))
                        mstore(add(m, 0x1a0), s)
                        pop(staticcall(gas(), 0x01, add(m, 0x140), 0x80, 0x00, 0x20))
                    }
                    if iszero(eq(mload(0x00), mload(add(m, 0x20)))) {
                        mstore(add(m, 0x2c0), or(shl(128, 2), div(sub(v, base), 0x60)))
                        break
                    }
                }
                // The channel's slot and lane (NectarTypes.channelSlot), over the already hashed words 1..4: the
                // lane must rise; the rise is paid.
                // Words 1..3 already read (client, node, partner): a self pair rewrites word 4, a route pair whose
                // node is the higher address swaps words 2 and 3.
                let shift := 0
                {
                    let node := mload(add(m, 0x40))
                    let partner := mload(add(m, 0x60))
                    switch eq(node, partner)
                    case 1 {
                        let channelId := mload(add(m, 0x80))
                        shift := shl(7, and(channelId, 1))
                        mstore(add(m, 0x80), shr(1, channelId))
                    }
                    default {
                        if gt(node, partner) {
                            mstore(add(m, 0x40), partner)
                            mstore(add(m, 0x60), node)
                            shift := 128
                        }
                    }
                }
                mstore(0x00, keccak256(add(m, 0x20), 0x80))
                let slot := keccak256(0x00, 0x40)
                let lanes := sload(slot)
                let already := and(shr(shift, lanes), 0xffffffffffffffffffffffffffffffff)
                let cumulative := mload(add(m, 0xa0))
                if iszero(gt(cumulative, already)) {
                    mstore(add(m, 0x2c0), or(shl(128, 3), div(sub(v, base), 0x60)))
                    break
                }
                let delta := sub(cumulative, already)
                let spentSoFar := add(mload(add(m, 0x2a0)), delta)
                if gt(spentSoFar, mload(add(m, 0x260))) {
                    mstore(add(m, 0x2c0), or(shl(128, 4), div(sub(v, base), 0x60)))
                    break
                }
                mstore(add(m, 0x2a0), spentSoFar)
                // cumulative < 2^128 and above this lane's value: adding the rise in place leaves the other lane
                sstore(slot, add(lanes, shl(shift, delta)))
                let cell := add(mload(add(m, 0x240)), shl(5, shr(224, calldataload(v))))
                mstore(cell, add(mload(cell), delta))
            }
            spent := mload(add(m, 0x2a0))
            failure := shr(128, mload(add(m, 0x2c0)))
            failedAt := and(mload(add(m, 0x2c0)), 0xffffffffffffffffffffffffffffffff)
        }
    }

    /// @dev Settles one client's vouchers; returns what the client owes in total. `index` is the batch position of
    ///      the group's first voucher, for error reporting.
    function _settleClient(
        bytes32 domain,
        ClientVouchers calldata group,
        address[] calldata nodes,
        uint256[] memory nodeGross,
        uint256 index
    ) internal returns (uint256 spent) {
        address client = group.client;
        if (client == address(0)) revert InvalidSignature(index);
        uint256 available = escrow.balanceOf(client);
        uint256 failure;
        uint256 at;
        (spent, failure, at) = _settleVouchers(domain, client, available, group.vouchers, nodes, nodeGross);
        if (failure == FAIL_NODE_INDEX) revert BadNodeIndex(index + at);
        if (failure == FAIL_SIGNATURE) revert InvalidSignature(index + at);
        if (failure == FAIL_REPLAY) revert VoucherReplay(index + at);
        if (failure == FAIL_ESCROW) revert InsufficientEscrow(index + at);
    }

    /// @dev Turns per-node gross amounts into escrow credits: each node's net plus one credit for the summed fee.
    function _credits(address[] calldata nodes, uint256[] memory nodeGross)
        internal
        view
        returns (Escrow.Credit[] memory credits, uint256 fee)
    {
        uint256 paidNodes;
        for (uint256 n; n < nodes.length; ++n) {
            if (nodeGross[n] != 0) ++paidNodes;
        }
        credits = new Escrow.Credit[](paidNodes + 1);
        uint256 bps = feeBps;
        uint256 j;
        for (uint256 n; n < nodes.length; ++n) {
            uint256 gross = nodeGross[n];
            if (gross == 0) continue;
            uint256 nodeFee = gross * bps / 10_000;
            fee += nodeFee;
            credits[j++] = Escrow.Credit(nodes[n], gross - nodeFee);
        }
        credits[j] = Escrow.Credit(feeRecipient, fee);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Settles a batch of vouchers: pays each channel's new cumulative amount minus what it was already
    ///         paid, from the client's escrow to the node's escrow earnings, minus the protocol fee.
    /// @dev Reverts (naming the voucher's batch position) with `VoucherReplay`, `InvalidSignature`,
    ///      `InsufficientEscrow` or `BadNodeIndex`, and with `EmptyBatch` if nothing is settled.
    /// @param nodes The batch's node addresses, referenced by index from each voucher.
    /// @param groups One group per client.
    /// @return gross Total credits moved out of client escrow.
    function settle(address[] calldata nodes, ClientVouchers[] calldata groups) external returns (uint256 gross) {
        bytes32 domain = _domainSeparatorV4();
        uint256[] memory nodeGross = new uint256[](nodes.length);
        Escrow.Debit[] memory debits = new Escrow.Debit[](groups.length);
        uint256 index;
        for (uint256 g; g < groups.length; ++g) {
            uint256 spent = _settleClient(domain, groups[g], nodes, nodeGross, index);
            debits[g] = Escrow.Debit(groups[g].client, spent);
            gross += spent;
            index += groups[g].vouchers.length;
        }
        if (gross == 0) revert EmptyBatch();
        (Escrow.Credit[] memory credits, uint256 fee) = _credits(nodes, nodeGross);
        escrow.applySettlement(debits, credits);
        emit BatchSettled(msg.sender, index, gross, fee);
    }

    /// @notice Records the receipts Merkle root of `epoch` (sorted-pair tree, see docs/protocol.md), once.
    /// @dev Root committers only (`NotRootCommitter`); reverts with `EpochAlreadyCommitted` or `EmptyRoot`.
    function commitEpochRoot(uint64 epoch, bytes32 root, uint32 count) external {
        if (!isRootCommitter[msg.sender]) revert NotRootCommitter();
        if (root == bytes32(0) || count == 0) revert EmptyRoot();
        EpochRoot storage slot = _epochs[epoch];
        if (slot.root != bytes32(0)) revert EpochAlreadyCommitted(epoch);
        _epochs[epoch] = EpochRoot(root, count, uint64(block.timestamp));
        emit EpochRootCommitted(epoch, root, count, msg.sender);
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

    /// @notice The committed root of `epoch`, its receipt count and commit time (zeros if none).
    function epochRoot(uint64 epoch) external view returns (bytes32 root, uint32 count, uint64 committedAt) {
        EpochRoot storage e = _epochs[epoch];
        return (e.root, e.count, e.committedAt);
    }

    /// @notice True when `leaf` (keccak256 of a receipt's struct hash) is in `epoch`'s committed tree.
    function verifyInclusion(uint64 epoch, bytes32 leaf, bytes32[] calldata proof) external view returns (bool) {
        bytes32 root = _epochs[epoch].root;
        return root != bytes32(0) && MerkleProof.verifyCalldata(proof, root, leaf);
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

    /// @notice The Merkle leaf of a receipt: keccak256(hashStruct(receipt)).
    function receiptLeaf(Receipt calldata receipt) external pure returns (bytes32) {
        return keccak256(abi.encode(NectarTypes.hash(receipt)));
    }
}
