"""STAR text tables: the particle and optics loops of a ``.star`` file as pandas tables, and back.

The format layer under :mod:`cryospin.io.star` (RELION particles <-> :class:`ParticleSet`) and
:mod:`cryospin.io.star_write`: which block holds the particles (RELION 3.0, 3.1, 5), the
optics groups merged into the particle rows, the pixel size a table gives, an optics group
selected, numeric columns checked, and a ``data_<name>`` loop written with each cell as the
input's text. Nothing here knows poses, CTF objects or stacks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryospin.errors import InputError

__all__ = [
    "read_star_tables",
    "numeric_table",
    "finite_column",
    "merge_optics",
    "pixel_sizes_angstrom",
    "select_optics_group",
    "numbers",
    "format_number",
    "loop_text",
]


# ---------------------------------------------------------------------------- reading
def read_star_tables(
    path: str | Path, *, as_text: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particle table and the optics table (None for RELION 3.0) of a star file.

    The particle table is the block named ``particles`` (3.1+), else the first loop holding
    ``rlnImageName`` (3.0: ``data_images``, ``data_``, ...). Block order does not matter.
    Columns that hold only numbers are read as numbers; with ``as_text`` every value is the
    text the file holds (what a writer needs to give it back unchanged).
    """
    particles, optics = _read_text_tables(Path(path))
    if as_text:
        return particles, optics
    return numeric_table(particles), None if optics is None else numeric_table(optics)


def _star_labels(path: Path) -> list[str]:
    """Every loop label (``_rlnX ...`` line) of a star file."""
    labels: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("_"):
                labels.add(line.split()[0][1:])
    return sorted(labels)


def numeric_table(df: pd.DataFrame) -> pd.DataFrame:
    """A text table with each column of numbers parsed (as ``starfile`` parses them); other
    columns stay text."""
    out = df.copy()
    for col in out.columns:
        try:
            out[col] = pd.to_numeric(out[col])
        except (ValueError, TypeError):
            pass
    return out


def _read_text_tables(path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The particle and optics tables of :func:`read_star_tables`, every value as text."""
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_star_labels(path))
    except Exception as exc:  # noqa: BLE001 - parser errors are bad input
        raise InputError(f"cannot parse STAR file ({type(exc).__name__}: "
                         f"{_one_line(str(exc))})", path) from None
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    for name, df in tables.items():
        dup = sorted(set(df.columns[df.columns.duplicated()].tolist()))
        if dup:
            raise InputError(f"column {', '.join(map(str, dup))} appears more than once in "
                             f"data_{name}", path)
    particles = tables.get("particles")
    if particles is None:
        for name, df in tables.items():
            if name != "optics" and "rlnImageName" in df.columns:
                particles = df
                break
    if particles is None:
        raise InputError("no particle table (a loop with rlnImageName) in the STAR file", path)
    optics = tables.get("optics")
    return particles, optics


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def finite_column(df: pd.DataFrame, col: str, path: str | Path | None, what: str,
                   *, integer: bool = False, positive: bool = False) -> np.ndarray:
    """Column ``col`` of ``df`` as float64 `(N,)`, rejecting non-numeric or non-finite values
    (and, when asked, non-integers or values <= 0) with an InputError naming the row."""
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num)
    if integer:
        bad |= np.isfinite(num) & (num != np.round(num))
    if positive:
        bad |= np.isfinite(num) & (num <= 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        need = ("a positive " if positive else "an " if integer else "a ") + (
            "integer" if integer else "number")
        raise InputError(f"{col} in {what} row {k + 1} is {raw.iloc[k]!r}, not {need}", path)
    return num


def merge_optics(
    particles: pd.DataFrame, optics: pd.DataFrame | None, path: str | Path | None = None
) -> pd.DataFrame:
    """Copy each particle's optics-group columns into the particle table (new DataFrame).

    Columns present in both tables keep the particle's value.
    """
    df = particles.copy()
    if "rlnOpticsGroup" in df.columns:
        df["rlnOpticsGroup"] = finite_column(df, "rlnOpticsGroup", path, "the particle table",
                                              integer=True).astype(np.int64)
    if optics is None or len(optics) == 0:
        return df
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError("optics table has no rlnOpticsGroup column", path)
    optics = optics.copy()
    optics["rlnOpticsGroup"] = finite_column(optics, "rlnOpticsGroup", path, "data_optics",
                                              integer=True).astype(np.int64)
    if optics["rlnOpticsGroup"].duplicated().any():
        dup = sorted(set(optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()]
                         .tolist()))
        raise InputError(f"optics group {dup} defined more than once in data_optics", path)
    if "rlnOpticsGroup" not in df.columns:
        if len(optics) != 1:
            raise InputError("particles lack rlnOpticsGroup but there are several optics "
                             "groups", path)
        df["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    table = optics.set_index("rlnOpticsGroup")
    groups = df["rlnOpticsGroup"].to_numpy()
    missing = sorted(set(groups.tolist()) - set(table.index.tolist()))
    if missing:
        raise InputError(f"particles refer to optics groups {missing} absent from data_optics",
                         path)
    for col in table.columns:
        if col not in df.columns:
            df[col] = table[col].reindex(groups).to_numpy()
    return df


def pixel_sizes_angstrom(df: pd.DataFrame) -> np.ndarray:
    """Per-particle pixel size (Å) `(N,)` from a merged table; NaN where unknown.

    Precedence: ``rlnImagePixelSize`` (3.1+), ``rlnPixelSize``, then
    ``rlnDetectorPixelSize [µm] · 1e4 / rlnMagnification`` (3.0). Values <= 0 or non-numeric
    are unknown (NaN); :func:`read_relion_star` rejects non-numeric ones before this.
    """
    n = len(df)

    def col(name: str) -> np.ndarray:
        return pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=np.float64)

    if "rlnImagePixelSize" in df.columns:
        v = col("rlnImagePixelSize")
    elif "rlnPixelSize" in df.columns:
        v = col("rlnPixelSize")
    elif "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        det, mag = col("rlnDetectorPixelSize"), col("rlnMagnification")
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(mag > 0, det * 1e4 / mag, np.nan)
    else:
        return np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        return np.where(v > 0, v, np.nan)  # 0 (or junk) means unknown


def select_optics_group(
    particles: pd.DataFrame, optics: pd.DataFrame | None, group: int | str,
    path: str | Path | None = None,
) -> tuple[np.ndarray, int]:
    """Rows of the particles in optics group ``group`` and that group's number.

    Parameters
    ----------
    particles : the particle table (after :func:`merge_optics`: it has ``rlnOpticsGroup``).
    optics : the optics table (numbers or text), None for RELION 3.0.
    group : the group's number (``rlnOpticsGroup``; an int or a string of digits) or its
        name (``rlnOpticsGroupName``).

    Returns
    -------
    rows : `(n,)` int64, increasing
        0-based rows of ``particles`` in the group.
    number : int
        The group's ``rlnOpticsGroup``.

    Raises
    ------
    InputError
        No optics table, an unknown group (the message lists the groups), an empty group.
    """
    if optics is None or len(optics) == 0 or "rlnOpticsGroup" not in optics.columns:
        raise InputError("--optics-group: this star has no data_optics table (RELION 3.0 "
                         "style: one optics group)", path)
    numbers = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy(np.float64)
    names = (optics["rlnOpticsGroupName"].astype(str).str.strip().tolist()
             if "rlnOpticsGroupName" in optics.columns else [""] * len(optics))
    key = str(group).strip()
    if key.isdigit():
        hit = [i for i, n in enumerate(numbers) if n == int(key)]
    else:
        hit = [i for i, n in enumerate(names) if n == key]
    if not hit:
        known = ", ".join(f"{int(n)}" + (f" ({nm})" if nm else "")
                          for n, nm in zip(numbers, names, strict=True) if np.isfinite(n))
        raise InputError(f"--optics-group {key}: no such optics group (the star has {known})",
                         path)
    number = int(numbers[hit[0]])
    rows = np.flatnonzero(particles["rlnOpticsGroup"].to_numpy(np.float64) == number)
    if rows.size == 0:
        raise InputError(f"--optics-group {key}: no particle is in optics group {number}", path)
    return rows.astype(np.int64), number



# ---------------------------------------------------------------------------- text
def numbers(text: pd.Series) -> np.ndarray:
    """A text (or number) column as float64 `(N,)` (a new, writable array); NaN where not a
    number."""
    return np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64, copy=True)


def format_number(value: float, integer: bool = False) -> str:
    """A number as the writer gives it: an integer, else ``%.12g``."""
    return str(int(value)) if integer else f"{float(value):.12g}"


def _star_cell(value: object) -> str:
    """One STAR value: text as it is (quoted when empty or holding whitespace), integers as
    they are, other numbers ``%.12g``."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, (bool, np.bool_)):
        text = str(int(value))
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    elif isinstance(value, (float, np.floating)):
        text = f"{float(value):.12g}"
    else:
        text = str(value)
    if not text or _WHITESPACE.search(text):
        return '"' + text + '"'
    return text


_WHITESPACE = re.compile(r"\s")


def loop_text(name: str, columns: Mapping[str, Sequence[object]]) -> str:
    """A STAR ``data_<name>`` loop block."""
    lines = ["", f"data_{name}", "", "loop_"]
    lines += [f"_{col} #{k}" for k, col in enumerate(columns, start=1)]
    cells = [[_star_cell(v) for v in values] for values in columns.values()]
    lines += [" ".join(row) for row in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n\n"
