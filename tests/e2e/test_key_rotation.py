"""Rotating the master key while the suite runs."""

import os
import subprocess
import sys

import httpx

from tests.support.registry import LocalRegistry
from tests.support.suite import Suite


def test_a_rotated_master_key_keeps_every_secret_readable(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry
) -> None:
    saved = api.post(
        "/v1/credentials",
        json={
            "registry": registry_token.host,
            "username": "alice",
            "secret": "alice-pass",
        },
    )
    assert saved.status_code == 201, saved.text
    env = {
        **os.environ,
        "CRABGLAMP_NATS_URL": suite.settings.nats_url,
        "CRABGLAMP_DATA_DIR": str(suite.settings.data_dir),
    }
    rotated = subprocess.run(
        [sys.executable, "-m", "services.cli", "keys", "rotate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "data keys rewrapped" in rotated.stderr
    key_file = suite.settings.data_dir / "master.key"
    assert key_file.stat().st_mode & 0o777 == 0o600

    # Re-verifying needs the current secret opened under the new master key.
    renamed = api.patch(f"/v1/credentials/{saved.json()['id']}", json={"name": "r"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "r"
