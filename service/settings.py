"""``ServiceSettings``: what the ledger's and the API's Settings share. Each service subclasses it with its own
``env_prefix`` (``NECTAR_LEDGER_``, ``NECTAR_API_``), its defaults for the fields declared here without one, its own
fields, and the names of its devnet secrets, which a production environment refuses."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nectar.deployment import domain_from_deployment
from nectar.paths import deployment_path, nectar_home


def home_sqlite_url(file_name: str, *, scheme: str = "sqlite") -> str:
    """A SQLite database under NECTAR_HOME (``scheme="sqla+sqlite"`` for a Celery broker)."""
    return f"{scheme}:///{nectar_home() / file_name}"


class ServiceSettings(BaseSettings):
    """Built once per process by the service's ``get_settings``; validated on construction."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # field name -> its public devnet default; outside a devnet each must be changed
    DEVNET_SECRETS: ClassVar[dict[str, str]] = {}
    # private-key fields that outside a devnet must be set, and not to a key of the public devnet accounts
    OWN_KEYS: ClassVar[tuple[str, ...]] = ()

    environment: Literal["devnet", "production"] = "devnet"  # production refuses the public devnet secrets
    host: str = "127.0.0.1"
    port: int
    database_url: str
    broker_url: str  # redis://... in production
    broker_polling_interval: float = 0.2  # seconds; only for the SQLAlchemy (SQLite) broker
    deployment_path: Path = Field(default_factory=deployment_path)
    admin_token: str  # bearer token of the admin endpoints

    def env_name(self, field: str) -> str:
        return f"{self.model_config.get('env_prefix', '')}{field}".upper()

    @model_validator(mode="after")
    def _refuse_devnet_secrets(self):
        if self.environment == "devnet":
            return self
        for name, default in self.DEVNET_SECRETS.items():
            if getattr(self, name) == default:
                raise ValueError(
                    f"{self.env_name(name)} is the public devnet default; set a secret value (e.g. "
                    f"{secrets.token_hex(16)!r}) or run with {self.env_name('environment')}=devnet"
                )
        if self.OWN_KEYS:
            from nectar.chain.accounts import dev_accounts

            public_keys = {a.private_key.lower() for a in dev_accounts()}
            for name in self.OWN_KEYS:
                value = getattr(self, name)
                if not value or value.lower() in public_keys:
                    raise ValueError(
                        f"{self.env_name(name)} must be set to a private key of your own in production "
                        f"(the devnet accounts' keys are public)"
                    )
        return self

    def deployment_account_key(self, role: str) -> str | None:
        """The private key of the deployment file's first account with ``role`` (a public demo key of a devnet), or
        None if it lists none. Raises OSError or ValueError if the file is missing or unreadable."""
        accounts = json.loads(self.deployment_path.read_text()).get("accounts", [])
        return next((a["privateKey"] for a in accounts if a.get("role") == role), None)

    def signing_domain(self) -> dict:
        """The EIP-712 domain of ``deployment_path``, under which this service signs or verifies vouchers and
        receipts (pass it to whatever signs: nothing reads the deployment from the environment)."""
        return domain_from_deployment(self.deployment_path)
