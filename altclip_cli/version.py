"""altclip's version, at the base of the package: any layer may read it (the package root
re-exports it as altclip_cli.__version__). Kept equal to pyproject.toml's by a test."""

__version__ = "0.1.0"
