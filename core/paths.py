"""Where Nectar keeps its state on disk: one home folder (``NECTAR_HOME``, see ``nectar.settings``)."""

from pathlib import Path

from nectar.settings import current


def nectar_home() -> Path:
    home = current().home
    home.mkdir(parents=True, exist_ok=True)
    return home


def deployment_path() -> Path:
    """The one deployment file (contract addresses + ABIs) written by ``nectar devnet`` (``NECTAR_DEPLOYMENT``)."""
    settings = current()
    if settings.deployment is not None:
        return settings.deployment
    return nectar_home() / "deployment.json"
