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
        keccak256("Voucher(address client,address node,uint64 channelId,uint128 cumulativeAmount)");

    /// @dev hashStruct(receipt). Encoded in two halves: one abi.encode of 16 values is too deep for the legacy
    ///      pipeline, and concatenating two abi.encode results is byte-identical (every value takes one word).
    function hash(Receipt calldata r) internal pure returns (bytes32) {
        bytes memory head = abi.encode(
            RECEIPT_TYPEHASH, r.sessionId, r.step, r.kind, r.modelId, r.blockStart, r.blockEnd, r.node
        );
        bytes memory tail = abi.encode(
            r.client, r.tokens, r.price, r.amount, r.inputCommitment, r.outputCommitment, r.fingerprint, r.timestamp
        );
        return keccak256(bytes.concat(head, tail));
    }

    /// @dev hashStruct(voucher).
    function hashVoucher(address client, address node, uint64 channelId, uint128 cumulativeAmount)
        internal
        pure
        returns (bytes32)
    {
        return keccak256(abi.encode(VOUCHER_TYPEHASH, client, node, channelId, cumulativeAmount));
    }
}
