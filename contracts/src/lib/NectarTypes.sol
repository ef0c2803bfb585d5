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
        bytes memory head =
            abi.encode(RECEIPT_TYPEHASH, r.sessionId, r.step, r.kind, r.modelId, r.blockStart, r.blockEnd, r.node);
        bytes memory tail = abi.encode(
            r.client, r.tokens, r.price, r.amount, r.inputCommitment, r.outputCommitment, r.fingerprint, r.timestamp
        );
        return keccak256(bytes.concat(head, tail));
    }

    /// @dev The signer of a voucher under EIP-712 `domain`, from its settle-calldata form: `packed` holds the
    ///      channel id (bits 128..191) and cumulative amount (bits 0..127), (r, vs) is an EIP-2098 signature.
    ///      Returns address(0) for a high s (EIP-2) or a failed recovery.
    ///      Settlement calls this once per voucher, so it hashes in scratch memory and calls the ecrecover
    ///      precompile directly instead of abi.encode + ecrecover (about 900 gas less per voucher, see
    ///      benchmarks/gas). Tests sign over `hashVoucher` + OpenZeppelin's EIP712, pinning the two paths together.
    function voucherSigner(bytes32 domain, address client, address node, uint256 packed, bytes32 r, bytes32 vs)
        internal
        view
        returns (address signer)
    {
        bytes32 typehash = VOUCHER_TYPEHASH;
        assembly ("memory-safe") {
            let m := mload(0x40) // scratch past the free memory pointer: never allocated, dead after this block
            mstore(m, typehash)
            mstore(add(m, 0x20), and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x40), and(node, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x60), and(shr(128, packed), 0xffffffffffffffff))
            mstore(add(m, 0x80), and(packed, 0xffffffffffffffffffffffffffffffff))
            let structHash := keccak256(m, 0xa0)
            mstore(m, hex"1901")
            mstore(add(m, 0x02), domain)
            mstore(add(m, 0x22), structHash)
            let digest := keccak256(m, 0x42)

            let s := and(vs, 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff)
            // EIP-2: only s <= n/2 is accepted (the other half are malleated copies)
            if iszero(gt(s, 0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0)) {
                mstore(m, digest)
                mstore(add(m, 0x20), add(shr(255, vs), 27))
                mstore(add(m, 0x40), r)
                mstore(add(m, 0x60), s)
                mstore(0x00, 0) // the precompile returns nothing when recovery fails
                pop(staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20))
                signer := mload(0x00)
            }
        }
    }

    /// @dev keccak256(abi.encode(client, node, pair)), the storage key of the channel pair `pair` = channelId >> 1
    ///      (channels 2k and 2k + 1 share one slot, see Settlement), without allocating.
    function pairKey(address client, address node, uint64 pair) internal pure returns (bytes32 key) {
        assembly ("memory-safe") {
            let m := mload(0x40)
            mstore(m, and(client, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x20), and(node, 0xffffffffffffffffffffffffffffffffffffffff))
            mstore(add(m, 0x40), and(pair, 0xffffffffffffffff))
            key := keccak256(m, 0x60)
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
