// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @notice A proof-of-inference receipt, signed by the node (docs/protocol.md, field order is the EIP-712 type).
struct Receipt {
    bytes32 sessionId;
    uint64 step;
    uint8 kind;
    bytes32 modelId;
    uint16 blockStart;
    uint16 blockEnd;
    address node;
    address client;
    uint32 tokens;
    uint128 price;
    uint128 amount;
    bytes32 inputCommitment;
    bytes32 outputCommitment;
    bytes32 fingerprint;
    uint64 timestamp;
}

/// @notice EIP-712 struct hashes of Nectar's signed types (docs/protocol.md is the source of truth for the strings).
/// @author Nectar
library NectarTypes {
    bytes32 internal constant RECEIPT_TYPEHASH = keccak256(
        "Receipt(bytes32 sessionId,uint64 step,uint8 kind,bytes32 modelId,uint16 blockStart,uint16 blockEnd,"
        "address node,address client,uint32 tokens,uint128 price,uint128 amount,bytes32 inputCommitment,"
        "bytes32 outputCommitment,bytes32 fingerprint,uint64 timestamp)"
    );

    bytes32 internal constant VOUCHER_TYPEHASH =
        keccak256("Voucher(address client,address node,address partner,uint64 channelId,uint128 cumulativeAmount)");

    /// @dev hashStruct(receipt). Encoded in two halves: one abi.encode of 16 values is too deep for the legacy
    ///      pipeline, and concatenating two abi.encode results is byte-identical (every value takes one word).
    function hash(Receipt calldata r) internal pure returns (bytes32) {
        bytes memory head =
            abi.encode(RECEIPT_TYPEHASH, r.sessionId, r.step, r.kind, r.modelId, r.blockStart, r.blockEnd, r.node);
        bytes memory tail = abi.encode(
            r.client, r.tokens, r.price, r.amount, r.inputCommitment, r.outputCommitment, r.fingerprint, r.timestamp
        );
        return keccak256(bytes.concat(head, tail));
    }

    /// @dev Where channel (client, node, partner, channelId) keeps its paid total: the storage key and the lane's
    ///      bit offset in that slot. Two channels share each slot (Settlement's `_channelPairs`):
    ///      - partner == node: channels 2k and 2k + 1 of one (client, node), key abi.encode(client, node, node, k),
    ///        lane channelId & 1;
    ///      - partner != node: the channels of one client to two nodes, e.g. two hops of a route, with the same
    ///        channel id, key abi.encode(client, lo, hi, channelId) with (lo, hi) = the two nodes sorted, lane 0 for
    ///        lo and 1 for hi.
    ///      The signed voucher names the partner, so a lane is only ever reached by its own (client, node, partner,
    ///      channelId), and keys of the two kinds differ (lo == hi only in the first).
    function channelSlot(address client, address node, address partner, uint64 channelId)
        internal
        pure
        returns (bytes32 key, uint256 shift)
    {
        assembly ("memory-safe") {
            let m := mload(0x40)
            client := and(client, 0xffffffffffffffffffffffffffffffffffffffff)
            node := and(node, 0xffffffffffffffffffffffffffffffffffffffff)
            partner := and(partner, 0xffffffffffffffffffffffffffffffffffffffff)
            channelId := and(channelId, 0xffffffffffffffff)
            mstore(m, client)
            switch eq(node, partner)
            case 1 {
                mstore(add(m, 0x20), node)
                mstore(add(m, 0x40), node)
                mstore(add(m, 0x60), shr(1, channelId))
                shift := shl(7, and(channelId, 1))
            }
            default {
                let hiIsNode := gt(node, partner)
                mstore(add(m, 0x20), xor(node, mul(hiIsNode, xor(node, partner)))) // lo: partner when node is hi
                mstore(add(m, 0x40), xor(partner, mul(hiIsNode, xor(node, partner)))) // hi: node when node is hi
                mstore(add(m, 0x60), channelId)
                shift := shl(7, hiIsNode)
            }
            key := keccak256(m, 0x80)
        }
    }

    /// @dev hashStruct(voucher).
    function hashVoucher(address client, address node, address partner, uint64 channelId, uint128 cumulativeAmount)
        internal
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(VOUCHER_TYPEHASH, client, node, partner, channelId, cumulativeAmount));
    }
}
