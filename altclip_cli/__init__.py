"""altclip: run BAAI's multilingual AltCLIP locally.

The package import is cheap on purpose (no torch): the command line's --help and shell
completion import it on every call. `load` imports the runtime on first use.
"""

from .version import __version__

__all__ = ["__version__", "load", "read_dataset"]


def load(model="BAAI/AltCLIP", **kwargs):
    """Load an AltCLIP model; see `altclip_cli.runtime.altclip.load` for the arguments."""
    from .runtime.altclip import load as _load

    return _load(model, **kwargs)


def read_dataset(folder):
    """Open a dataset written by `altclip embed ... -o DIR/` without merging it: an object with
    `.manifest` (dict), `.vectors` (the parts' memory-mapped arrays seen as one (N, D) array:
    len, shape, [i], [a:b], np.asarray; `.vectors.parts` lists the memmaps) and `.records`
    (an iterator over the sidecar lines in input order, "row" numbered as in `altclip merge`'s
    output, None for an input that failed). Raises AltclipError naming missing parts."""
    from .outputs.dataset import read_dataset as _read

    return _read(folder)
