"""nectar.settings: the NECTAR_* variables read once into RuntimeSettings, validated, never read at import time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nectar import settings
from nectar.cli import main as nectar_main
from nectar.paths import deployment_path, nectar_home
from nectar.settings import RuntimeSettings, SettingsError


@pytest.fixture(autouse=True)
def _fresh_settings():
    settings.reset()
    yield
    settings.reset()


def test_every_variable_is_parsed(tmp_path):
    env = {
        "NECTAR_HOME": str(tmp_path / "home"),
        "NECTAR_DEPLOYMENT": str(tmp_path / "d.json"),
        "NECTAR_INITIAL_PEERS": " /ip4/1.2.3.4/tcp/1/p2p/A,/ip4/5.6.7.8/tcp/2/p2p/B  /dns/x/tcp/3/p2p/C",
        "NECTAR_LOG_LEVEL": "debug",
        "NECTAR_EVENT_LOOP": "AsyncIO",
        "NECTAR_CPU_BLAS": "mkl",
        "NECTAR_GREEDY_HEAD": "INT8",
        "NECTAR_NATIVE": "off",
        "NECTAR_NATIVE_DECODE": "on",
        "NECTAR_CUDA_GRAPHS": "no",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "CC": "/usr/bin/my-cc",
        "NECTAR_TRACE": "/tmp/trace-{pid}.jsonl",
        "NECTAR_REPO_ROOT": str(tmp_path / "repo"),
        "NECTAR_CONTRACTS_OUT": str(tmp_path / "out"),
    }
    parsed = RuntimeSettings.from_env(env)
    assert parsed.home == tmp_path / "home" and parsed.deployment_path == tmp_path / "d.json"
    assert parsed.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/5.6.7.8/tcp/2/p2p/B", "/dns/x/tcp/3/p2p/C")
    assert (parsed.log_level, parsed.event_loop, parsed.cpu_blas, parsed.greedy_head) == (
        "DEBUG",
        "asyncio",
        "torch",
        "int8",
    )
    assert parsed.native is False and parsed.native_decode == "on" and parsed.compiler == "/usr/bin/my-cc"
    assert parsed.cuda_graphs is False and RuntimeSettings().cuda_graphs is True
    assert parsed.kernel_cache == tmp_path / "xdg" / "nectar" / "kernels"  # XDG's cache folder when not set itself
    assert RuntimeSettings.from_env({**env, "NECTAR_KERNEL_CACHE": str(tmp_path / "k")}).kernel_cache == tmp_path / "k"
    assert parsed.trace == "/tmp/trace-{pid}.jsonl" and parsed.trace_path == Path(f"/tmp/trace-{os.getpid()}.jsonl")
    assert RuntimeSettings().trace_path is None and parsed.repo_root == tmp_path / "repo"
    assert parsed.contracts_out == tmp_path / "out"
    for on in ("auto", "ON", "1", "true", "yes"):
        assert RuntimeSettings.from_env({"NECTAR_NATIVE": on}).native is True


def test_unset_or_empty_variables_keep_the_defaults():
    assert RuntimeSettings.from_env({}) == RuntimeSettings()
    assert RuntimeSettings.from_env({"NECTAR_CPU_BLAS": "", "NECTAR_HOME": "  "}) == RuntimeSettings()
    defaults = RuntimeSettings()
    assert defaults.home == Path.home() / ".nectar" and defaults.deployment_path == defaults.home / "deployment.json"
    assert (defaults.cpu_blas, defaults.native, defaults.initial_peers, defaults.log_level) == ("auto", True, (), None)


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("NECTAR_CPU_BLAS", "fast", "auto, torch, openblas or native"),
        ("NECTAR_EVENT_LOOP", "trio", "auto, uvloop or asyncio"),
        ("NECTAR_GREEDY_HEAD", "int4", "auto, bf16, int8 or off"),
        ("NECTAR_NATIVE_DECODE", "sometimes", "auto, on or off"),
        ("NECTAR_NATIVE", "maybe", "auto, on or off"),
        ("NECTAR_CUDA_GRAPHS", "sometimes", "auto, on or off"),
        ("NECTAR_LOG_LEVEL", "loud", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_takes(name, value, allowed):
    with pytest.raises(SettingsError) as caught:
        RuntimeSettings.from_env({name: value})
    assert f"{name} must be {allowed}" in str(caught.value) and repr(value) in str(caught.value).lower()
    assert isinstance(caught.value, ValueError)  # callers that caught ValueError before keep working


def test_the_default_is_read_lazily_cached_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv("NECTAR_CPU_BLAS", raising=False)
    first = settings.current()
    assert settings.current() is first  # cached: no new read while the variables stay the same
    monkeypatch.setenv("NECTAR_CPU_BLAS", "openblas")
    assert settings.current().cpu_blas == "openblas"  # a test or notebook that sets a variable sees it
    monkeypatch.setenv("NECTAR_CPU_BLAS", "fast")
    with pytest.raises(SettingsError, match="NECTAR_CPU_BLAS"):
        settings.current()


def test_configure_pins_the_settings_and_configured_restores_them(monkeypatch, tmp_path):
    monkeypatch.setenv("NECTAR_HOME", str(tmp_path / "from-env"))
    with settings.configured(home=tmp_path / "pinned") as pinned:
        monkeypatch.setenv("NECTAR_HOME", str(tmp_path / "changed"))
        assert settings.current() is pinned and nectar_home() == tmp_path / "pinned"
        assert deployment_path() == tmp_path / "pinned" / "deployment.json"
        settings.configure(deployment=str(tmp_path / "d.json"))  # what `nectar demo` and `nectar api` do
        assert deployment_path() == tmp_path / "d.json" and nectar_home() == tmp_path / "pinned"
    assert "NECTAR_DEPLOYMENT" not in os.environ or os.environ["NECTAR_DEPLOYMENT"] != str(tmp_path / "d.json")
    assert nectar_home() == tmp_path / "changed"  # back to the environment's
    with pytest.raises(SettingsError, match="NECTAR_GREEDY_HEAD"):
        settings.configure(greedy_head="int4")  # direct values are validated too


def test_nothing_is_read_at_import_and_a_bad_value_fails_where_it_is_used():
    env = {**os.environ, "NECTAR_CPU_BLAS": "fast", "NECTAR_EVENT_LOOP": "trio"}
    code = (
        "import nectar, nectar.paths, nectar.models, nectar.models.cpu_blas, nectar.models.greedy_head, "
        "nectar.models.native, nectar.wire.event_loop, nectar.chain.artifacts, nectar.client, nectar.cli, "
        "nectar.node.server, nectar.ledger.service, nectar.api.main\n"
        "import torch\n"
        "from nectar.models.cpu_blas import CpuMatmul\n"
        "try:\n"
        "    CpuMatmul.calibrate([torch.randn(8, 8)])\n"
        "except ValueError as e:\n"
        "    print('used:', e)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (
        "used: NECTAR_EVENT_LOOP must be auto, uvloop or asyncio, got 'trio'; NECTAR_CPU_BLAS must be auto, "
        "torch, openblas or native, got 'fast'" in ran.stdout
    )  # every bad variable at once


def test_the_nectar_command_reads_the_settings_once_up_front(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NECTAR_HOME", str(tmp_path))
    monkeypatch.setenv("NECTAR_GREEDY_HEAD", "int4")
    assert nectar_main(["models"]) == 2  # refused before the command runs, with the variable named
    assert "NECTAR_GREEDY_HEAD must be auto, bf16, int8 or off, got 'int4'" in capsys.readouterr().err
    monkeypatch.delenv("NECTAR_GREEDY_HEAD")
    assert nectar_main(["models"]) == 0
    assert str(tmp_path / "models") in capsys.readouterr().out
    assert settings._pinned is None  # the command's settings end with it (tests call main in-process)
