"""Turns revert data into ``ChainError``s that name the contract's custom error, e.g. ``InvalidSignature(index=3)``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector

logger = logging.getLogger(__name__)

# Solidity's built-in reverts: Error(string) and Panic(uint256).
_ERROR_STRING = bytes.fromhex("08c379a0")
_PANIC = bytes.fromhex("4e487b71")


class ChainError(RuntimeError):
    """A transaction or call the chain refused. ``error_name`` is the contract's custom error (e.g. ``"BadFee"``)
    and ``error_args`` its decoded arguments by name; both are ``None``/empty for failures without revert data."""

    def __init__(self, message: str, *, error_name: str | None = None, error_args: dict[str, Any] | None = None):
        super().__init__(message)
        self.error_name = error_name
        self.error_args = error_args or {}


def _abi_type(item: dict) -> str:
    if item["type"].startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in item["components"]) + ")" + item["type"][len("tuple") :]
    return item["type"]


class ErrorDecoder:
    """Maps 4-byte selectors to the custom errors declared in a set of ABIs (all deployed contracts together, since a
    revert can bubble up from a contract called by another)."""

    def __init__(self, abis: Iterable[list[dict]]):
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            for item in abi:
                if item.get("type") != "error":
                    continue
                types = [_abi_type(i) for i in item["inputs"]]
                selector = function_signature_to_4byte_selector(f"{item['name']}({','.join(types)})")
                self._errors[selector] = (item["name"], [i["name"] for i in item["inputs"]], types)

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """(error name, args) for revert ``data``; unknown selectors come back as their hex."""
        selector, payload = data[:4], data[4:]
        if selector == _ERROR_STRING:
            return "Error", {"message": abi_decode(["string"], payload)[0]}
        if selector == _PANIC:
            return "Panic", {"code": abi_decode(["uint256"], payload)[0]}
        if selector not in self._errors:
            return f"0x{data.hex()}", {}
        name, names, types = self._errors[selector]
        try:
            values = abi_decode(types, payload)
        except Exception:  # malformed payload: still name the error
            return name, {}
        return name, dict(zip(names, values))

    def to_error(self, data: bytes, *, context: str) -> ChainError:
        name, args = self.decode(data)
        shown = ", ".join(f"{k}={_show(v)}" for k, v in args.items())
        return ChainError(f"{name}({shown}) during {context}", error_name=name, error_args=args)


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, (bytes, bytearray)) else str(value)


def revert_data(exc: BaseException) -> bytes | None:
    """The raw revert bytes carried by a web3 exception (ContractCustomError, ContractLogicError, RPC errors)."""
    data = getattr(exc, "data", None)
    if isinstance(data, dict):
        data = data.get("data")
    if data is None and exc.args and isinstance(exc.args[0], dict):
        data = exc.args[0].get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    return None
