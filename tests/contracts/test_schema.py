"""The published contract covers every event, command and reply."""

import json
import subprocess
import sys
from pathlib import Path

from contracts.events import EVENT_TYPES
from contracts.schema import COMMANDS, asyncapi, json_schemas


def test_every_event_and_command_has_a_schema() -> None:
    schemas = json_schemas()
    assert set(EVENT_TYPES) <= set(schemas)
    for command, reply in COMMANDS.values():
        assert command.__name__ in schemas and reply.__name__ in schemas
    assert "sealed_secret" in json.dumps(schemas["CredentialAdded"])


def test_the_asyncapi_document_names_every_subject() -> None:
    document = asyncapi()
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert "crabglamp.events.credential.{id}" in addresses
    assert "crabglamp.events.app.{id}" in addresses
    assert set(COMMANDS) <= addresses
    refs = json.dumps(document)
    for name in json_schemas():
        assert f"#/components/schemas/{name}" in refs


def test_the_cli_writes_the_contract(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "contracts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "asyncapi.json").read_text())["asyncapi"] == "3.0.0"
    assert (tmp_path / "schemas" / "DeployFailed.json").exists()
