"""altclip: run BAAI's multilingual AltCLIP locally.

The package import is cheap on purpose (no torch): the command line's --help and shell
completion import it on every call. `load` imports the runtime on first use.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(model="BAAI/AltCLIP", **kwargs):
    """Load an AltCLIP model; see `altclip_cli.runtime.altclip.load` for the arguments."""
    from .runtime.altclip import load as _load

    return _load(model, **kwargs)
