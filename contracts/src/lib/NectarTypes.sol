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

    /// @dev The EIP-712 digest of a voucher under `domain`: keccak256("\x19\x01" ++ domain ++ hashStruct(voucher)).
    ///      Settlement calls this once per voucher, so it hashes in scratch memory past the free memory pointer
    ///      instead of allocating with abi.encode (about 500 gas less per voucher; `test_VoucherDigestMatchesProtocolString`
    ///      and every signature test pin it to the plain `hashVoucher` encoding).
    function voucherDigest(bytes32 domain, address client, address node, uint64 channelId, uint128 cumulativeAmount)
        internal
        pure
        returns (bytes32 digest)
    {
        bytes32 typehash = VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40) // never allocated: the words below are dead once hashed
            mstore(m, typehash)
            mstore(add(m, 0x20), and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x40), and(node, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x60), and(channelId, 0xffffffffffffffff))
            mstore(add(m, 0x80), and(cumulativeAmount, 0xffffffffffffffffffffffffffffffff))
            let structHash := keccak256(m, 0xa0)
            mstore(m, hex"1901")
            mstore(add(m, 0x02), domain)
            mstore(add(m, 0x22), structHash)
            digest := keccak256(m, 0x42)
        }
    }

    /// @dev keccak256(abi.encode(client, node, channelId)), the storage key of a channel, without allocating.
    function channelKey(address client, address node, uint64 channelId) internal pure returns (bytes32 key) {
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x20), and(node, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x40), and(channelId, 0xffffffffffffffff))
            key := keccak256(m, 0x60)
        }
    }

    /// @dev ecrecover through the precompile directly: the builtin's generated wrapper costs ~150 gas more per call
    ///      and settlement recovers once per voucher. Returns address(0) when recovery fails.
    function ecrecoverCompact(bytes32 digest, uint256 v, bytes32 r, uint256 s) internal view returns (address signer) {
        assembly ("memory-safe") {
            let m := mload(0x40) // scratch, not allocated
            mstore(m, digest)
            mstore(add(m, 0x20), v)
            mstore(add(m, 0x40), r)
            mstore(add(m, 0x60), s)
            mstore(0x00, 0) // the precompile writes nothing on failure
            pop(staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20))
            signer := mload(0x00)
        }
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
