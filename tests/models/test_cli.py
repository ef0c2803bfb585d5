"""`nectar models`: lists built-in models with their conversion state and explains how to use a local folder."""

from __future__ import annotations

import pytest

from nectar.cli import main as nectar_main
from nectar.models.cli import main


def test_lists_builtin_models_and_local_path_usage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NECTAR_HOME", str(tmp_path))
    assert nectar_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "not converted" in out
    assert "--model /path/to/checkpoint" in out
    assert all(name in out for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "bloom", "gemma2", "falcon"))
    assert str(tmp_path / "models") in out


def test_unknown_model_to_convert_is_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--convert", "gpt-5"])
    assert caught.value.code == 2
    assert "smollm2-135m" in capsys.readouterr().err
