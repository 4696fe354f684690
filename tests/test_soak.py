"""The soak test (tools/soak, issue 7 item 4) for 60 seconds, as root: churn of functions
and VSAs, SIGKILLed apps and hostile clients must cost the well-behaved app no request and
leave every trusted process, fd count, RSS, tc class, namespace and loop device as it was."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root

pytestmark = pytest.mark.root

DURATION = 60


def test_soak_60_seconds(tmp_path: Path) -> None:
    require_root()
    summary_path = tmp_path / "soak.json"
    done = subprocess.run([sys.executable, "-m", "tools.soak", "--duration", str(DURATION), "--json", str(summary_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=DURATION + 300)
    assert summary_path.exists(), done.stdout + done.stderr
    summary = json.loads(summary_path.read_text())
    assert done.returncode == 0 and summary["ok"], done.stdout[-4000:] + done.stderr[-2000:]
    activity = summary["activity"]
    # The soak must have done what it claims, or a quiet run would pass for a clean one.
    assert activity["client"]["answered"] > 100
    assert activity["churn"]["killed"] > 0 and activity["killed_echo_apps"] > 0
    assert activity["hostile_net"]["udp"] > 0
