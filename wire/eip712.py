"""EIP-712 for receipts and vouchers: the domain, type hashes, digests, and signing/recovery.

The digest is computed here directly (cached domain separator and type hashes, C keccak) and signed/recovered with
coincurve, which is several times faster than eth-account's generic path while giving byte-identical signatures
(tests cross-check against ``Account.sign_typed_data``). The domain is always passed in by the caller: whoever
builds a signer or a wallet reads it from the deployment (``nectar.deployment.domain_from_deployment``).
"""

from __future__ import annotations

from functools import lru_cache

import coincurve
from eth_utils import to_checksum_address

from nectar.wire.receipts import Receipt, SignedReceipt, SignedVoucher, Voucher, _unhex, keccak256

ZERO_ADDRESS = "0x" + "00" * 20
DEVNET_CHAIN_ID = 31337
# secp256k1 group order; signatures with s above half of it are malleable copies and are rejected (as OpenZeppelin).
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N = _SECP256K1_N // 2

RECEIPT_TYPE = (
    "Receipt(bytes32 sessionId,uint64 step,uint8 kind,bytes32 modelId,uint16 blockStart,uint16 blockEnd,"
    "address node,address client,uint32 tokens,uint128 price,uint128 amount,bytes32 inputCommitment,"
    "bytes32 outputCommitment,bytes32 fingerprint,uint64 timestamp)"
)
VOUCHER_TYPE = "Voucher(address client,address node,address partner,uint64 channelId,uint128 cumulativeAmount)"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
# A client's countersignature of a receipt it accepted: ``receipt`` is the receipt's hashStruct (the ledger's evidence
# that the client saw and checked this work; reputation counts only countersigned work, docs/economics.md)
ACCEPTANCE_TYPE = "Acceptance(bytes32 receipt)"

RECEIPT_TYPEHASH = keccak256(RECEIPT_TYPE.encode())
VOUCHER_TYPEHASH = keccak256(VOUCHER_TYPE.encode())
DOMAIN_TYPEHASH = keccak256(DOMAIN_TYPE.encode())
ACCEPTANCE_TYPEHASH = keccak256(ACCEPTANCE_TYPE.encode())


def _fields(type_string: str) -> list[tuple[str, str]]:
    inner = type_string[type_string.index("(") + 1 : -1]
    return [(part.split(" ")[1], part.split(" ")[0]) for part in inner.split(",")]


# eth-account's full-message format, used by callers that want the generic path (and by the cross-check tests).
EIP712_TYPES = {
    "EIP712Domain": [{"name": n, "type": t} for n, t in _fields(DOMAIN_TYPE)],
    "Receipt": [{"name": n, "type": t} for n, t in _fields(RECEIPT_TYPE)],
    "Voucher": [{"name": n, "type": t} for n, t in _fields(VOUCHER_TYPE)],
    "Acceptance": [{"name": n, "type": t} for n, t in _fields(ACCEPTANCE_TYPE)],
}


class InvalidSignature(ValueError):
    """A signature that is not 65 bytes, has a bad v, a malleable s, or does not recover to any key."""


def make_domain(chain_id: int, verifying_contract: str) -> dict:
    return {
        "name": "Nectar",
        "version": "1",
        "chainId": int(chain_id),
        "verifyingContract": to_checksum_address(verifying_contract),
    }


@lru_cache(maxsize=64)
def _domain_separator_cached(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak256(
        DOMAIN_TYPEHASH
        + keccak256(name.encode())
        + keccak256(version.encode())
        + chain_id.to_bytes(32, "big")
        + bytes(12)
        + bytes.fromhex(verifying_contract[2:])
    )


def domain_separator(domain: dict) -> bytes:
    return _domain_separator_cached(
        domain["name"], domain["version"], int(domain["chainId"]), domain["verifyingContract"].lower()
    )


@lru_cache(maxsize=4096)
def _address_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def receipt_struct_hash(receipt: Receipt) -> bytes:
    r = receipt
    return keccak256(
        b"".join(
            (
                RECEIPT_TYPEHASH,
                r.session_id,
                r.step.to_bytes(32, "big"),
                r.kind.to_bytes(32, "big"),
                r.model_id,
                r.block_start.to_bytes(32, "big"),
                r.block_end.to_bytes(32, "big"),
                _address_word(r.node),
                _address_word(r.client),
                r.tokens.to_bytes(32, "big"),
                r.price.to_bytes(32, "big"),
                r.amount.to_bytes(32, "big"),
                r.input_commitment,
                r.output_commitment,
                r.fingerprint,
                r.timestamp.to_bytes(32, "big"),
            )
        )
    )


def voucher_struct_hash(voucher: Voucher) -> bytes:
    v = voucher
    return keccak256(
        VOUCHER_TYPEHASH
        + _address_word(v.client)
        + _address_word(v.node)
        + _address_word(v.partner)
        + v.channel_id.to_bytes(32, "big")
        + v.cumulative_amount.to_bytes(32, "big")
    )


def typed_digest(domain: dict, struct_hash: bytes) -> bytes:
    return keccak256(b"\x19\x01" + domain_separator(domain) + struct_hash)


def receipt_digest(receipt: Receipt, domain: dict) -> bytes:
    return typed_digest(domain, receipt_struct_hash(receipt))


def voucher_digest(voucher: Voucher, domain: dict) -> bytes:
    return typed_digest(domain, voucher_struct_hash(voucher))


def receipt_leaf(receipt: Receipt) -> bytes:
    """Merkle leaf of a receipt: keccak256(hashStruct(receipt)) (protocol.md)."""
    return keccak256(receipt_struct_hash(receipt))


# ---------------------------------------------------------------------------------------------------- signatures
@lru_cache(maxsize=256)
def _private_key(private_key: bytes) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(private_key)


def _key_bytes(private_key: bytes | str) -> bytes:
    if hasattr(private_key, "key"):  # an eth_account LocalAccount
        private_key = private_key.key
    if isinstance(private_key, str):
        private_key = _unhex("private_key", private_key, 32)
    return bytes(private_key)


def sign_digest(digest: bytes, private_key: bytes | str) -> bytes:
    """65-byte Ethereum signature r || s || v over a 32-byte digest (coincurve always produces low s)."""
    raw = _private_key(_key_bytes(private_key)).sign_recoverable(digest, hasher=None)
    return raw[:64] + bytes([raw[64] + 27])


def recover_digest_signer(digest: bytes, signature: bytes) -> str:
    """Checksum address that signed ``digest``; raises ``InvalidSignature`` for malformed or malleable signatures."""
    if len(signature) != 65:
        raise InvalidSignature(f"signature must be 65 bytes, got {len(signature)}")
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise InvalidSignature(f"signature has an invalid recovery byte {signature[64]}")
    s = int.from_bytes(signature[32:64], "big")
    if s == 0 or s > _HALF_N or int.from_bytes(signature[:32], "big") == 0:
        raise InvalidSignature("signature has a zero r/s or a malleable (high) s")
    try:
        public = coincurve.PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception as e:
        raise InvalidSignature(f"signature does not recover to a public key ({e})") from None
    return _address_from_public(public.format(compressed=False))


@lru_cache(maxsize=4096)
def _address_from_public(uncompressed: bytes) -> str:
    return to_checksum_address(keccak256(uncompressed[1:])[12:])


def address_of(private_key: bytes | str) -> str:
    return _address_from_public(_private_key(_key_bytes(private_key)).public_key.format(compressed=False))


def sign_receipt(receipt: Receipt, private_key: bytes | str, domain: dict) -> SignedReceipt:
    return SignedReceipt(receipt, sign_digest(receipt_digest(receipt, domain), private_key))


def recover_receipt_signer(signed: SignedReceipt, domain: dict) -> str:
    return recover_digest_signer(receipt_digest(signed.receipt, domain), signed.signature)


def sign_voucher(voucher: Voucher, private_key: bytes | str, domain: dict) -> SignedVoucher:
    return SignedVoucher(voucher, sign_digest(voucher_digest(voucher, domain), private_key))


def recover_voucher_signer(signed: SignedVoucher, domain: dict) -> str:
    return recover_digest_signer(voucher_digest(signed.voucher, domain), signed.signature)


def acceptance_digest(receipt_hash: bytes, domain: dict) -> bytes:
    """What a client signs to countersign a receipt: the EIP-712 digest of ``Acceptance(receipt_struct_hash)``."""
    return typed_digest(domain, keccak256(ACCEPTANCE_TYPEHASH + receipt_hash))


def countersign_receipt(receipt: Receipt, private_key: bytes | str, domain: dict) -> bytes:
    """The client's 65-byte countersignature of a receipt it checked and accepts."""
    return sign_digest(acceptance_digest(receipt_struct_hash(receipt), domain), private_key)


def recover_countersigner(receipt_hash: bytes, signature: bytes, domain: dict) -> str:
    """Who countersigned the receipt whose hashStruct is ``receipt_hash``; ``InvalidSignature`` if malformed."""
    return recover_digest_signer(acceptance_digest(receipt_hash, domain), signature)


def full_typed_message(primary_type: str, message: dict, domain: dict) -> dict:
    """The message in eth-account's ``full_message`` form (for wallets and cross-checks)."""
    types = {"EIP712Domain": EIP712_TYPES["EIP712Domain"], primary_type: EIP712_TYPES[primary_type]}
    return {"types": types, "primaryType": primary_type, "domain": domain, "message": message}


__all__ = [
    "InvalidSignature",
    "make_domain",
    "domain_separator",
    "sign_receipt",
    "recover_receipt_signer",
    "sign_voucher",
    "recover_voucher_signer",
    "acceptance_digest",
    "countersign_receipt",
    "recover_countersigner",
    "receipt_struct_hash",
    "receipt_digest",
    "voucher_struct_hash",
    "voucher_digest",
    "typed_digest",
    "receipt_leaf",
    "address_of",
    "sign_digest",
    "recover_digest_signer",
    "EIP712_TYPES",
    "full_typed_message",
    "DEVNET_CHAIN_ID",
    "ZERO_ADDRESS",
]
