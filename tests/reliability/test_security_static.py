"""Properties of the source itself: no code-executing deserialisation, constant-time key comparison."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = [p for package in ("server", "engine", "models") for p in (ROOT / package).rglob("*.py")]


def test_no_code_executing_deserialisation_in_runtime_code():
    forbidden = re.compile(r"\b(pickle|marshal|shelve|dill)\b|torch\.load\(|(?<![.\w])(eval|exec)\(|yaml\.load\(")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in RUNTIME for i, line in enumerate(p.read_text().splitlines(), 1)
            if forbidden.search(line)]  # fmt: skip
    assert RUNTIME and not hits, hits


def test_the_api_key_is_compared_in_constant_time():
    guard = (ROOT / "server" / "app.py").read_text()
    assert "hmac.compare_digest" in guard
    assert not re.search(r"==\s*self\._key|self\._key\s*==", guard)
