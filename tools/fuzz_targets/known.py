"""Findings the fuzzers make that are routed elsewhere, by crash signature.

Each entry is a defect in code this fuzzing work does not own, with a saved reproducer in
``tests/fuzz_corpus/<target>/``. ``tools/fuzz`` reports them as known instead of new, and
tests/test_fuzz.py lets their reproducers fail as expected failures; it also checks that
every entry still reproduces, so an entry must go as soon as its defect is fixed.
"""

from __future__ import annotations

KNOWN_OPEN: dict[str, str] = {}
