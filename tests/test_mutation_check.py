"""scripts/mutation_check.py stays usable: every planted bug still applies to the source as it
is (exactly one place in an existing file), so a moved or rewritten line cannot silently turn
a mutant into a no-op."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import mutation_check as mc  # noqa: E402

sys.path.pop(0)
PKG = ROOT / "src" / "codebook_features"


@pytest.mark.parametrize("mutant", mc.MUTANTS, ids=lambda m: m.name)
def test_every_mutant_applies_once_and_names_existing_tests(mutant):
    path = PKG / mutant.file
    assert path.is_file(), f"{mutant.name}: no file {mutant.file}"
    count = path.read_text().count(mutant.old)
    assert count == 1, f"{mutant.name}: its line is in {mutant.file} {count} times, not once"
    assert mutant.old != mutant.new
    missing = [t for t in mutant.tests if not (ROOT / t).is_file()]
    assert not missing, f"{mutant.name}: no test file {missing}"


def test_mutant_names_are_unique():
    names = [m.name for m in mc.MUTANTS]
    assert len(names) == len(set(names))
