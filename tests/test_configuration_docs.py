"""docs/configuration.md is generated from the config classes: it fails here when a setting changed without it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_up_to_date():
    expected = _generator().render()
    assert (ROOT / "docs" / "configuration.md").read_text() == expected, (
        "docs/configuration.md is out of date: run `python scripts/gen_config_docs.py` and commit the result"
    )


def test_it_lists_every_setting_of_every_object():
    from nectar.api.core.config import Settings as ApiSettings
    from nectar.cli_kit import options_of
    from nectar.client.config import ClientConfig
    from nectar.ledger.core.config import Settings as LedgerSettings
    from nectar.node.config import NodeConfig
    from nectar.settings import RuntimeSettings

    text = (ROOT / "docs" / "configuration.md").read_text()
    for cls in (RuntimeSettings, NodeConfig, ClientConfig, LedgerSettings, ApiSettings):
        for option in options_of(cls).values():
            assert f"`{option.env or option.name}`" in text, (cls.__name__, option.name)
    assert "`--cache-mb` (in MiB)" in text and "`--price`" in text and "(serve, worker)" in text
