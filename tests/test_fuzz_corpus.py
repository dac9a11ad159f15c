"""Replay of the fuzz corpus (tests/fuzz_corpus/<target>/*): every input the fuzzers kept as
interesting, and every input that once crashed a reader, must end in nothing but a FastADError
(the targets in tests/fuzz_targets.py swallow exactly that). Fuzzing itself is not part of the
tests: `python -m tests.fuzz_targets TARGET tests/fuzz_corpus/TARGET -max_total_time=300`.
"""
from __future__ import annotations

import logging
import warnings

import pytest

from .fuzz_targets import CORPUS, FUZZERS


def _corpus(target: str) -> list:
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file()) if (CORPUS / target).is_dir() else []


@pytest.mark.parametrize("target", sorted(FUZZERS))
def test_fuzz_corpus_replays_without_crash(target, monkeypatch):
    monkeypatch.setenv("FASTAD_COMPILE", "0")
    files = _corpus(target)
    assert files, f"no corpus for {target} in {CORPUS / target}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            for path in files:
                try:
                    FUZZERS[target](path.read_bytes())
                except Exception as e:  # noqa: BLE001 - report which corpus file crashed
                    raise AssertionError(f"{path.name}: {type(e).__name__}: {e}") from e
        finally:
            logging.disable(logging.NOTSET)
