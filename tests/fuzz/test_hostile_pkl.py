"""Hostile cryoDRGN pickles: wrong shapes and types, mismatched N, truncation, and pickles
that try to run code (they must be refused without running)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryospin.errors import InputError
from cryospin.io import clear_stack_cache, load_indices, load_particles
from cryospin.io.pkl import read_cryodrgn_ctf, read_cryodrgn_poses, safe_load_pickle
from cryospin.rotations import random_rotations
from tests.fuzz import FUZZ, expect_input_error, outcome, write_stack

N, L, PIXEL = 4, 16, 2.0


def _ctf(n: int = N) -> np.ndarray:
    a = np.zeros((n, 9), np.float32)
    a[:, 0], a[:, 1] = L, PIXEL
    a[:, 2], a[:, 3], a[:, 4] = 15000 + np.arange(n), 14000, 10
    a[:, 5], a[:, 6], a[:, 7], a[:, 8] = 300, 2.7, 0.1, 0
    return a


def _poses(n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rot = random_rotations(n, generator=None).double().numpy() if n else np.zeros((0, 3, 3))
    return rot, np.random.default_rng(0).uniform(-0.1, 0.1, (n, 2))


def _dump(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).normal(size=(N, L, L)).astype(np.float32)
    return write_stack(tmp_path / "s.mrcs", data, PIXEL)


# ------------------------------------------------------------------ valid pickles, any protocol
@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_valid_pickles_every_protocol(tmp_path: Path, stack: Path, protocol: int) -> None:
    rot, trans = _poses()
    ctf_path = _dump(tmp_path / "ctf.pkl", _ctf(), protocol)
    pose_path = _dump(tmp_path / "pose.pkl", (rot, trans), protocol)
    clear_stack_cache()
    ps = load_particles(stack, ctf_pkl=ctf_path, poses_pkl=pose_path)
    np.testing.assert_array_equal(ps.rotations.numpy(), rot)
    np.testing.assert_allclose(ps.shifts_px.numpy(), -trans * L)
    np.testing.assert_array_equal(ps.ctf.defocus_u_angstrom.numpy(), _ctf()[:, 2])
    # numpy scalars and containers are allowed too
    obj = {"a": [np.float32(1.5), np.int64(3)], "b": (1, "x", None, b"y")}
    assert safe_load_pickle(_dump(tmp_path / "o.pkl", obj, protocol)) == obj


# ------------------------------------------------------------------ malicious pickles
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("wrap", [lambda m: m, lambda m: (m, np.zeros((N, 2))),
                                  lambda m: (np.zeros((N, 3, 3)), m), lambda m: [m],
                                  lambda m: {"rot": m}])
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_refused_without_running(tmp_path: Path, stack: Path, wrap,
                                                  protocol: int) -> None:
    marker = tmp_path / "pwned"
    bad = _dump(tmp_path / "evil.pkl", wrap(_RunsCode(marker)), protocol)
    for fn, kw in [(read_cryodrgn_poses, {"path": bad, "box_px": L}),
                   (read_cryodrgn_ctf, {"path": bad}), (safe_load_pickle, {"path": bad}),
                   (load_indices, {"ind": bad})]:
        expect_input_error(fn, "evil.pkl", "refusing", "system", **kw)
    clear_stack_cache()
    expect_input_error(load_particles, "evil.pkl", path=stack, no_ctf=True, poses_pkl=bad)
    expect_input_error(load_particles, "evil.pkl", path=stack, ctf_pkl=bad)
    expect_input_error(load_particles, "evil.pkl", path=stack, no_ctf=True, ind=bad)
    assert not marker.exists(), "the pickle ran code"
    expect_input_error(safe_load_pickle, "refusing", "eval",
                       path=_dump(tmp_path / "e.pkl", _Evals(), protocol))


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'true'\ntR.",                              # protocol 0 GLOBAL
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04exec\x93.",
    b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR.",
    b"ctorch\nload\n.",
    b"cnumpy\nload\n(S'x'\ntR.",
    b"cnumpy.core.multiarray\n_reconstruct\nq\x00.",              # allowed name, no call: fine
])
def test_hand_written_global_opcodes(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "g.pkl"
    path.write_bytes(payload)
    kind, val = outcome(safe_load_pickle, path)
    if b"_reconstruct" in payload:
        assert kind == "ok" and callable(val)
        expect_input_error(read_cryodrgn_ctf, "g.pkl", path=path)
    else:
        assert kind == "input_error" and "refusing" in str(val)


# ------------------------------------------------------------------ wrong content
@pytest.mark.parametrize("obj", [
    np.zeros((N, 8), np.float32), np.zeros((N, 10), np.float32), np.zeros((N, 3, 3)),
    np.zeros(9), np.zeros((0, 9)), {"ctf": _ctf()}, [1, 2, 3], "ctf", b"ctf", None, 3.5,
    [[1, 2], [3]], _ctf().astype(np.complex64), _ctf().astype(bool), _ctf().astype(object),
    np.array(["a"] * 9 * N).reshape(N, 9),
])
def test_ctf_wrong_shape_or_type(tmp_path: Path, obj) -> None:
    path = _dump(tmp_path / "ctf.pkl", obj)
    expect_input_error(read_cryodrgn_ctf, "ctf.pkl", path=path)


@pytest.mark.parametrize("col, value, needle", [(0, np.nan, "NaN"), (2, np.inf, "NaN"),
                                                (0, 0, "box"), (0, 15.5, "box"),
                                                (1, -1, "pixel"), (1, 0, "pixel")])
def test_ctf_bad_values(tmp_path: Path, col: int, value: float, needle: str) -> None:
    a = _ctf()
    a[:, col] = value
    expect_input_error(read_cryodrgn_ctf, "ctf.pkl", needle, path=_dump(tmp_path / "ctf.pkl", a))


def _rot_trans() -> tuple[np.ndarray, np.ndarray]:
    return _poses()


@pytest.mark.parametrize("obj", [
    (np.zeros((N, 3, 4)), np.zeros((N, 2))), (np.zeros((N, 3)), np.zeros((N, 2))),
    (_rot_trans()[0], np.zeros((N, 3))), (_rot_trans()[0], np.zeros((N + 1, 2))),
    (_rot_trans()[0] * 2, np.zeros((N, 2))), (np.zeros((0, 3, 3)), np.zeros((0, 2))),
    {"rot": _rot_trans()[0]}, "pose", b"pose", 7, None, (), (1, 2, 3, 4),
    ([[1, 2], [3]], np.zeros((N, 2))), (_rot_trans()[0], "abc"), (_rot_trans()[0], {"t": 1}),
    (np.full((N, 3, 3), np.nan), np.zeros((N, 2))), (_rot_trans()[0].astype(complex),),
])
def test_pose_wrong_shape_or_type(tmp_path: Path, obj) -> None:
    path = _dump(tmp_path / "pose.pkl", obj)
    expect_input_error(read_cryodrgn_poses, "pose.pkl", path=path, box_px=L)


def test_pose_forms_accepted(tmp_path: Path) -> None:
    rot, trans = _poses()
    for obj in [(rot, trans), [rot, trans], rot, (rot,), (rot, None)]:
        r, s = read_cryodrgn_poses(_dump(tmp_path / "pose.pkl", obj), L)
        np.testing.assert_array_equal(r.numpy(), rot)
        expect = -trans * L if isinstance(obj, (tuple, list)) and len(obj) == 2 and \
            obj[1] is not None else np.zeros((N, 2))
        np.testing.assert_allclose(s.numpy(), expect)


@pytest.mark.parametrize("n", [N - 1, N + 1])
def test_row_count_mismatch_with_particles(tmp_path: Path, stack: Path, n: int) -> None:
    clear_stack_cache()
    expect_input_error(load_particles, "pose.pkl", f"{n} rows", path=stack, no_ctf=True,
                       poses_pkl=_dump(tmp_path / "pose.pkl", _poses(n)))
    expect_input_error(load_particles, "ctf.pkl", f"{n} rows", path=stack,
                       ctf_pkl=_dump(tmp_path / "ctf.pkl", _ctf(n)))


def test_ctf_box_and_pixel_conflicts(tmp_path: Path, stack: Path) -> None:
    a = _ctf()
    a[:, 0] = 2 * L
    clear_stack_cache()
    expect_input_error(load_particles, "ctf.pkl", "box", path=stack,
                       ctf_pkl=_dump(tmp_path / "ctf.pkl", a))
    a = _ctf()
    a[:, 1] = 3 * PIXEL
    expect_input_error(load_particles, "ctf.pkl", "pixel", path=stack,
                       ctf_pkl=_dump(tmp_path / "ctf.pkl", a))


@FUZZ
@given(which=st.sampled_from(["ctf", "pose"]), frac=st.floats(0, 1, exclude_max=True),
       protocol=st.sampled_from([2, 4, 5]))
def test_truncated_pickles(tmp_path_factory, which: str, frac: float, protocol: int) -> None:
    tmp = tmp_path_factory.mktemp("trunc")
    obj = _ctf() if which == "ctf" else _poses()
    raw = pickle.dumps(obj, protocol=protocol)
    path = tmp / "t.pkl"
    path.write_bytes(raw[: int(frac * len(raw))])
    fn = read_cryodrgn_ctf if which == "ctf" else (lambda p: read_cryodrgn_poses(p, L))
    kind, val = outcome(fn, path)
    assert kind == "input_error" and "t.pkl" in str(val)


@FUZZ
@given(blob=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x80\x04", b"\x80\x02",
                                                              b"c", b"\x80\x05\x95"]))
def test_random_bytes(tmp_path_factory, blob: bytes, prefix: bytes) -> None:
    path = tmp_path_factory.mktemp("rnd") / "r.pkl"
    path.write_bytes(prefix + blob)
    outcome(read_cryodrgn_ctf, path)
    outcome(read_cryodrgn_poses, path, L)
    outcome(load_indices, path)


def test_missing_or_directory(tmp_path: Path) -> None:
    expect_input_error(read_cryodrgn_ctf, "nope.pkl", "not found", path=tmp_path / "nope.pkl")
    (tmp_path / "d.pkl").mkdir()
    expect_input_error(read_cryodrgn_poses, "d.pkl", path=tmp_path / "d.pkl", box_px=L)


@pytest.mark.parametrize("obj", [np.array([0, 2]), [0, 2], np.array([0, 2], np.int32)])
def test_index_pickles(tmp_path: Path, stack: Path, obj) -> None:
    clear_stack_cache()
    ps = load_particles(stack, no_ctf=True, ind=_dump(tmp_path / "ind.pkl", obj))
    assert ps.image_index.tolist() == [0, 2]
    for bad in [np.array([0, N]), np.array([0.5]), {"a": 1}, "0 1", np.array([[0, 1]])]:
        expect_input_error(load_particles, "ind.pkl", path=stack, no_ctf=True,
                           ind=_dump(tmp_path / "ind.pkl", bad))
    with pytest.raises(InputError):
        load_indices(np.array([-1]), 3)


@pytest.mark.parametrize("protocol", [0, 2])
def test_pickles_written_by_numpy_1(tmp_path: Path, protocol: int) -> None:
    """cryoDRGN files in the wild name ``numpy.core.multiarray`` (numpy 1.x)."""
    raw = pickle.dumps(_ctf(), protocol=protocol)
    assert b"numpy._core.multiarray\n_reconstruct" in raw  # GLOBAL opcode, text form
    old = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    (tmp_path / "ctf.pkl").write_bytes(old)
    ctf, box, apix = read_cryodrgn_ctf(tmp_path / "ctf.pkl")
    assert (box, apix) == (L, PIXEL)
    np.testing.assert_array_equal(ctf.defocus_u_angstrom.numpy(), _ctf()[:, 2])
