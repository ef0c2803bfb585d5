"""Maps the `nectar` import root onto the top-level folders (works for `pip install .` and `-e .`)."""

import os

from setuptools import setup

FOLDERS = {
    "nectar": "core",
    "nectar.wire": "wire",
    "nectar.models": "models",
    "nectar.node": "node",
    "nectar.client": "client",
    "nectar.ledger": "ledger",
    "nectar.chain": "chain",
    "nectar.api": "api",
    "nectar.service": "service",
}


def find_packages_under(root_package: str, folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        if "__init__.py" in filenames:
            relative = os.path.relpath(dirpath, folder)
            found.append(root_package if relative == "." else f"{root_package}.{relative.replace(os.sep, '.')}")
    return found


packages = [pkg for root, folder in FOLDERS.items() for pkg in find_packages_under(root, folder)]
setup(packages=packages, package_dir=FOLDERS)
