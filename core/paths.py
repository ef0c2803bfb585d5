"""Where Nectar keeps its state on disk: one home folder, overridable with ``NECTAR_HOME``."""
import os
from pathlib import Path


def nectar_home() -> Path:
    home = Path(os.environ.get("NECTAR_HOME", Path.home() / ".nectar"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def deployment_path() -> Path:
    """The one deployment file (contract addresses + ABIs) written by ``nectar devnet``."""
    return Path(os.environ.get("NECTAR_DEPLOYMENT", nectar_home() / "deployment.json"))
