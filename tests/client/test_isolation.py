"""The client tree stands alone: importing it (and its CLI) loads nothing from the service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import turnid.client

PROBE = """
import json, sys
import turnid.client, turnid.client.cli
print(json.dumps(sorted(m for m in sys.modules if m.startswith("turnid"))))
"""


def test_importing_the_client_loads_no_service_module() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(done.stdout)
    assert "turnid.client" in loaded
    assert [name for name in loaded if name.startswith(("turnid.service", "turnid.testing"))] == []


def test_the_client_sources_never_name_the_service() -> None:
    root = Path(turnid.client.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert sources
    for source in sources:
        text = source.read_text()
        assert "turnid.service" not in text, source
        assert "turnid.testing" not in text, source


def test_the_client_is_typed() -> None:
    assert (Path(turnid.client.__file__).parent / "py.typed").is_file()
