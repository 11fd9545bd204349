"""The README's first example runs as printed, as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_first_readme_example_runs_and_replays(tmp_path):
    match = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert match is not None
    script = tmp_path / "quickstart.py"
    script.write_text(match.group(1))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    assert ["{'id': 1, 'state': 'approved'}", "True"] == result.stdout.splitlines()
