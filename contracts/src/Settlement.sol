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
///      is three words: `packed = nodeIndex << 192 | channelId << 128 | cumulativeAmount` and an EIP-2098 compact
///      signature (r, vs). Each client's escrow and each node's earnings are written once per batch (in Escrow).
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

    uint256 private constant HALF_WORD_MASK = (1 << 255) - 1;
    uint256 private constant SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    Escrow public immutable escrow;

    /// @notice Receives the protocol fee as escrow earnings.
    address public feeRecipient;

    /// @notice Protocol fee in basis points of each settled amount.
    uint16 public feeBps;

    mapping(address => bool) public isRootCommitter;

    /// @dev keccak256(abi.encode(client, node, channelId)) => cumulative amount settled so far.
    mapping(bytes32 channelKey => uint256) internal _paid;

    mapping(uint64 epoch => EpochRoot) internal _epochs;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

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

    /// @dev Recovers an EIP-2098 compact signature. Plain `ecrecover`: OpenZeppelin's tryRecover costs ~400 gas
    ///      more per voucher. Returns address(0) for an invalid signature or a high s (EIP-2), which never equals a
    ///      group's client since `settle` rejects a zero client.
    function _recover(bytes32 digest, bytes32 r, bytes32 vs) internal view returns (address) {
        uint256 s = uint256(vs) & HALF_WORD_MASK;
        if (s > SECP256K1_HALF_N) return address(0);
        return NectarTypes.ecrecoverCompact(digest, (uint256(vs) >> 255) + 27, r, s);
    }

    /// @dev Checks voucher `v` of `client` (batch position `index`) and records its channel's new paid total.
    ///      Returns the node position it pays and the amount it adds.
    function _settleVoucher(
        bytes32 domain,
        address client,
        address[] calldata nodes,
        SignedVoucher calldata v,
        uint256 index
    ) internal returns (uint256 nodeIndex, uint256 delta) {
        uint256 packed = v.packed;
        nodeIndex = packed >> 192;
        if (nodeIndex >= nodes.length) revert BadNodeIndex(index);
        address node = nodes[nodeIndex];
        uint64 channelId = uint64(packed >> 128);
        uint128 cumulative = uint128(packed);

        bytes32 digest = NectarTypes.voucherDigest(domain, client, node, channelId, cumulative);
        if (_recover(digest, v.r, v.vs) != client) {
            revert InvalidSignature(index);
        }

        bytes32 key = NectarTypes.channelKey(client, node, channelId);
        uint256 already = _paid[key];
        if (cumulative <= already) revert VoucherReplay(index);
        unchecked {
            delta = cumulative - already; // safe: cumulative > already
        }
        _paid[key] = cumulative;
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
        SignedVoucher[] calldata vouchers = group.vouchers;
        uint256 end = index + vouchers.length;
        for (uint256 i; index < end; ++index) {
            (uint256 nodeIndex, uint256 delta) = _settleVoucher(domain, client, nodes, vouchers[i], index);
            // Unchecked: each delta is below 2^128 and a batch holds far fewer than 2^128 vouchers, so neither sum
            // can overflow; `i` is bounded by the loop condition.
            unchecked {
                spent += delta;
                nodeGross[nodeIndex] += delta; // nodeIndex < nodes.length == nodeGross.length, checked in _settleVoucher
                ++i;
            }
            if (spent > available) revert InsufficientEscrow(index);
        }
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

    /// @notice Cumulative amount already settled on channel (client, node, channelId).
    function paid(address client, address node, uint64 channelId) external view returns (uint256) {
        return _paid[NectarTypes.channelKey(client, node, channelId)];
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
    function voucherDigest(address client, address node, uint64 channelId, uint128 cumulativeAmount)
        external
        view
        returns (bytes32)
    {
        return NectarTypes.voucherDigest(_domainSeparatorV4(), client, node, channelId, cumulativeAmount);
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
