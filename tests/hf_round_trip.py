"""Shared by the parity tests: transformers dir -> mmlm.load -> mmlm.save -> export_hf -> transformers."""

from __future__ import annotations

from pathlib import Path

import mmlm
from mmlm.convert.hf import export_hf


def hf_round_trip(hf, tmp_path: Path, hf_class):
    """(ours loaded from hf's directory, the transformers model reloaded from our export)."""
    hf.save_pretrained(tmp_path / "hf")
    ours = mmlm.load(tmp_path / "hf")
    mmlm.save(ours, tmp_path / "mmlm")
    export_hf(mmlm.load(tmp_path / "mmlm"), tmp_path / "exported")
    return ours, hf_class.from_pretrained(tmp_path / "exported").eval()
