"""Anvil's well-known development accounts and the roles the devnet gives them. Never use these keys elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from eth_account import Account

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"

# index -> role on the devnet; clients and nodes get credits, everyone has Anvil's 10,000 ETH.
ROLES = (
    "deployer",  # owns the contracts
    "ledger",  # commits epoch roots, settles batches
    "verifier",  # attests failed spot checks
    "treasury",  # receives protocol fees and slashed stake
    "node",
    "node",
    "node",
    "client",
    "client",
    "client",
    "arbiter",  # dismisses spot-check cases (Slashing); never the deployer, who manages the verifiers
)


@dataclass(frozen=True)
class DevAccount:
    index: int
    role: str
    address: str
    private_key: str  # 0x-prefixed hex

    def to_json(self) -> dict:
        return {"index": self.index, "role": self.role, "address": self.address, "privateKey": self.private_key}


@lru_cache(maxsize=1)
def dev_accounts() -> tuple[DevAccount, ...]:
    Account.enable_unaudited_hdwallet_features()
    out = []
    for i, role in enumerate(ROLES):
        acct = Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}")
        out.append(DevAccount(i, role, acct.address, "0x" + acct.key.hex().removeprefix("0x")))
    return tuple(out)
