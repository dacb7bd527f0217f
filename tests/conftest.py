import shutil
import signal
import sys
from pathlib import Path

import pytest

# A test run started in the background of a script (`cmd &`) inherits SIGINT ignored, and so does
# every process it starts: the tests of Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

sys.path.insert(0, str(Path(__file__).parent))  # test helpers: tiny.py, tokenizer_fixture.py, hubserver.py


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's caches: altclip's own and Hugging Face's."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("ALTCLIP_HOME", str(root / "altclip"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may reach the internet; hub tests use a local server


@pytest.fixture(scope="session")
def _tiny_model_master(tmp_path_factory):
    from tiny import write_model

    return write_model(tmp_path_factory.mktemp("tiny") / "altclip-tiny")


@pytest.fixture
def tiny_model_dir(_tiny_model_master, tmp_path):
    """A tiny random AltCLIP model folder in Hugging Face layout (a fresh copy per test)."""
    return Path(shutil.copytree(_tiny_model_master, tmp_path / "altclip-tiny"))


@pytest.fixture(scope="session")
def tiny_loaded(_tiny_model_master):
    """(folder, model): the tiny model's folder, never modified, and altclip's fp32 load of it."""
    from altclip_cli.runtime.altclip import load

    return _tiny_model_master, load(str(_tiny_model_master), device="cpu", precision="fp32")


@pytest.fixture
def model(tiny_loaded):
    """The tiny model's folder (the -m argument of a command)."""
    return tiny_loaded[0]


@pytest.fixture
def loaded(tiny_loaded):
    """altclip's fp32 load of the tiny model."""
    return tiny_loaded[1]
