"""The README's embedding example really runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_embedding_example_runs() -> None:
    """The README's example runs, cancels its turn, and prints what the README says."""
    text = README.read_text()
    match = re.search(r"<!-- embedding-example.*?-->\n```python\n(.*?)```", text, re.DOTALL)
    assert match is not None, "README lost its embedding example"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 22
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    expected = re.search(r"It prints `(.*?)`", text)
    assert expected is not None
    assert result.stdout.strip() == expected.group(1)
