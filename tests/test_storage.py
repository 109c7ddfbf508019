"""storage: atomic output directories get the permissions of an ordinary new directory."""

import os
import stat

import pytest

from megatron_vrft.storage import atomic_dir


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_dir_has_the_mode_of_a_new_directory(tmp_path, umask):
    before = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out", overwrite=False) as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(before)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o777 & ~umask
    assert (tmp_path / "out" / "weights.bin").read_bytes() == b"x"
    assert not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
