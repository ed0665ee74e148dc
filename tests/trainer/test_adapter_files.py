"""Adapter directories are written with the process umask's modes, whatever modes the writing library chose."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.adapter import process_umask, write_atomically

#: Umasks that keep the owner's own read/write/search bits (a process cannot sensibly write under the others).
UMASKS = st.integers(0, 0o077)
#: Modes a library may create files / directories with (always readable and writable by the owner).
FILE_MODES = st.sampled_from([0o600, 0o640, 0o644, 0o660, 0o666, 0o400 | 0o200])
DIR_MODES = st.sampled_from([0o700, 0o750, 0o755, 0o770, 0o777])


def test_process_umask_reads_the_mask_without_changing_it():
    previous = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(previous)


@settings(max_examples=40, deadline=None)
@given(umask=UMASKS, files=st.lists(st.tuples(st.integers(0, 2), FILE_MODES), min_size=1, max_size=6),
       dir_mode=DIR_MODES)
def test_written_adapter_dirs_follow_the_umask(tmp_path_factory, umask, files, dir_mode):
    root = tmp_path_factory.mktemp("w")

    def fill(tmp: Path) -> None:  # files at depth 0-2, with the modes a library might have picked
        for i, (depth, mode) in enumerate(files):
            d = tmp.joinpath(*[f"sub{j}" for j in range(depth)])
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, dir_mode) if depth else None
            path = d / f"f{i}.bin"
            path.write_bytes(b"x")
            os.chmod(path, mode)

    previous = os.umask(umask)
    try:
        target = write_atomically(root / "adapter", fill)
    finally:
        os.umask(previous)
    for p in [target, *target.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(umask))
    assert not list(root.glob(".adapter.tmp-*"))
