"""`altclip serve`'s OpenAPI schema tells the truth: schemathesis generates requests from it
(valid ones and ones that break it) against a live server on loopback with the tiny model, and
checks every answer: its status documented with its body, valid requests accepted, invalid ones
refused, no server error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("schemathesis")

from altclip_cli.serve import client  # noqa: E402
from test_serve import start_server  # noqa: E402

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_the_schema_true(_tiny_model_master, tmp_path):
    s = start_server(_tiny_model_master, "--batch-size", "2", tcp=True)  # 8 images a request: small arrays
    try:
        schema = client.request(s.target, "GET", "/openapi.json", None, headers={})
        assert schema[0] == 200
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG), "run",
             f"{s.target}/openapi.json", "--checks", "all", "--max-examples", "10", "--seed", "16",
             "--generation-database", "none", "--no-color", "--request-timeout", "60", "--workers", "1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
        assert "passed" in run.stdout and "failure" not in run.stdout.split("SUMMARY")[-1]
    finally:
        assert s.stop() == 0, s.log()
    assert "Traceback" not in s.log()
