"""Ships the checkout's ``configs/`` inside the package as ``detoxrl/presets``.

``configs/`` stays the presets' one home (``tiny.yaml``, ``mini/``, ``recommended.yaml``,
...); a wheel carries a copy under ``detoxrl/presets`` so that ``detoxrl demo`` and
``--config configs/tiny.yaml`` work from any folder (``detoxrl.config.presets``). Everything
else about the build is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
FOLDERS = sorted({p.parent.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml")})
PRESETS = {".".join(["detoxrl", "presets", *folder.parts[1:]]): folder.as_posix()
           for folder in FOLDERS}

# Namespace packages too (a package folder without __init__.py), as packages.find did.
PACKAGES = find_namespace_packages("src", include=["detoxrl*"], exclude=["*.__pycache__"])

setup(packages=[*PACKAGES, *PRESETS],
      package_dir={"": "src", **PRESETS},
      package_data={name: ["*.yaml"] for name in PRESETS})
