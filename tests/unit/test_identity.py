"""The particle-set identity a run records for --resume (cryospin.io.identity), and the 3D-map
check of plain stacks (cryospin.io.mrc.looks_like_3d_map)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryospin.errors import InputError
from cryospin.io.identity import (
    check_same_particles,
    identity_differences,
    load_identity,
    particle_set_identity,
    save_identity,
)
from cryospin.io.mrc import looks_like_3d_map, write_map, write_stack
from cryospin.io.particles import load_particles


def _noise(n: int, box: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)


def _stack(path: Path, images: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stack(path, images, 2.0)
    return load_particles(path, no_ctf=True)


def _blob(L: int) -> np.ndarray:
    c = np.arange(L) - L // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return (np.exp(-((x - 2) ** 2 + y**2 + z**2) / 4.0)
            + np.exp(-((x + 2) ** 2 + (y - 1) ** 2 + (z + 1) ** 2) / 3.0)).astype(np.float32)


def test_identity_names_what_differs(tmp_path: Path) -> None:
    images = _noise(12, 8, 0)
    a = particle_set_identity(_stack(tmp_path / "a.mrcs", images))
    assert a.num_particles == 12 and a.box_px == 8
    same = particle_set_identity(_stack(tmp_path / "copy" / "a.mrcs", images))
    assert identity_differences(a, same) == []  # the same data in another folder
    fewer = particle_set_identity(_stack(tmp_path / "b" / "a.mrcs", images[:5]))
    assert identity_differences(a, fewer)[0] == "count 5 vs 12"
    renamed = particle_set_identity(_stack(tmp_path / "c.mrcs", images))
    assert identity_differences(a, renamed) == ["image names"]
    other = images.copy()
    other[-1] += 1
    changed = particle_set_identity(_stack(tmp_path / "d" / "a.mrcs", other))
    assert identity_differences(a, changed) == ["pixels of the first/last image"]
    bigger = particle_set_identity(_stack(tmp_path / "e" / "a.mrcs", _noise(12, 10, 0)))
    assert identity_differences(a, bigger) == ["box 10 vs 8 px",
                                               "pixels of the first/last image"]
    ps = _stack(tmp_path / "f" / "a.mrcs", images)
    reordered = particle_set_identity(ps.subset(np.arange(12)[::-1]))
    assert "image names" in identity_differences(a, reordered)


def test_check_same_particles(tmp_path: Path) -> None:
    ps = _stack(tmp_path / "a.mrcs", _noise(6, 8, 1))
    record = tmp_path / "run" / "particle_set.json"
    assert check_same_particles(record, ps, tmp_path / "run") is None  # an older run
    record.parent.mkdir()
    save_identity(record, particle_set_identity(ps))
    assert load_identity(record) == particle_set_identity(ps)
    assert check_same_particles(record, ps, tmp_path / "run") == particle_set_identity(ps)
    with pytest.raises(InputError, match=r"run: these are not the particles the run started "
                                         r"with \(count 3 vs 6, .*start a new run with -o"):
        check_same_particles(record, ps.subset([0, 1, 2]), tmp_path / "run")
    record.write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        load_identity(record)


def test_a_map_is_not_a_stack(tmp_path: Path) -> None:
    write_map(tmp_path / "map.mrc", _blob(16), 2.0)  # ISPG 1, 16³
    assert looks_like_3d_map(tmp_path / "map.mrc")
    with pytest.raises(InputError, match=r"map\.mrc: looks like a 3D map \(space group 1, "
                                         r"16³\), not a particle stack"):
        load_particles(tmp_path / "map.mrc", no_ctf=True)
    shutil.copy(tmp_path / "map.mrc", tmp_path / "map.mrcs")
    (tmp_path / "list.txt").write_text("map.mrcs\n")
    with pytest.raises(InputError, match="looks like a 3D map"):
        load_particles(tmp_path / "list.txt", no_ctf=True)


def test_a_map_named_by_a_star_or_cs_is_not_a_stack(tmp_path: Path) -> None:
    """The one stack check covers the stacks a .star or .cs names, as it does a .txt's."""
    write_map(tmp_path / "map.mrcs", _blob(16), 2.0)  # ISPG 1, 16³
    (tmp_path / "p.star").write_text("data_particles\nloop_\n_rlnImageName\n1@map.mrcs\n")
    table = np.zeros(1, dtype=[("blob/path", "S16"), ("blob/idx", "<u4")])
    table["blob/path"] = b"map.mrcs"
    with open(tmp_path / "p.cs", "wb") as fh:
        np.save(fh, table)
    for name in ("p.star", "p.cs"):
        with pytest.raises(InputError, match=r"map\.mrcs: looks like a 3D map \(space group 1, "
                                             r"16³\), not a particle stack"):
            load_particles(tmp_path / name, no_ctf=True)


def test_stacks_with_as_many_images_as_pixels_still_load(tmp_path: Path) -> None:
    write_stack(tmp_path / "ispg0.mrcs", _noise(16, 16, 2), 2.0)  # cryospin's stacks: ISPG 0
    with mrcfile.new(tmp_path / "ispg1.mrcs") as m:  # some programs write stacks with ISPG 1
        m.set_data(_noise(16, 16, 3))
        assert int(m.header.ispg) == 1
    for name in ("ispg0.mrcs", "ispg1.mrcs"):
        assert not looks_like_3d_map(tmp_path / name)
        assert len(load_particles(tmp_path / name, no_ctf=True)) == 16


@pytest.mark.shared_data
def test_real_stacks_are_not_maps_and_real_maps_are(shared_data: Path) -> None:
    stacks = sorted((shared_data / "particles").rglob("*.mrc*"))
    assert stacks
    for path in stacks:
        assert not looks_like_3d_map(path), path
    assert looks_like_3d_map(shared_data / "maps" / "EMD-3197.map")  # 20³, ISPG 1
