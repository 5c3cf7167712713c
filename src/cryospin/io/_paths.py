"""Resolving image-stack paths written in metadata files (private helper of the readers)."""

from __future__ import annotations

from pathlib import Path

from cryospin.errors import InputError

__all__ = ["resolve_stack_path"]


def _candidates(raw: str, base_dir: Path, datadir: Path | None) -> list[Path]:
    p = Path(raw)
    parts = p.parts
    out: list[Path] = []
    roots = [datadir] if datadir is not None else []
    roots.append(base_dir)
    if p.is_absolute():
        out.append(p)
        for root in roots:
            out.append(root / p.name)
        return out
    for root in roots:
        out.append(root / p)
        # cryoSPARC writes "J24/extract/x.mrc" relative to the project; RELION writes
        # "Extract/job012/x.mrcs" relative to its project: drop leading folders one by one
        for k in range(1, len(parts)):
            out.append(root / Path(*parts[k:]))
    return list(dict.fromkeys(out))  # first occurrence of each, in order


def resolve_stack_path(
    raw: str,
    *,
    base_dir: Path,
    datadir: Path | None,
    must_exist: bool,
    source: Path,
) -> Path:
    """The file a metadata path ``raw`` refers to.

    Tries, in order: ``datadir/raw`` then ``raw`` relative to ``base_dir`` (the metadata
    file's folder), each also with leading folders stripped one at a time (``J24/extract/a.mrc``
    -> ``extract/a.mrc`` -> ``a.mrc``). Absolute paths are tried as they are, then by file name.

    Raises
    ------
    InputError
        When ``must_exist`` and no candidate exists; the message names what was tried.
    """
    cands = _candidates(raw, base_dir, datadir)
    for c in cands:
        if c.is_file():
            return c
    if not must_exist:
        return cands[0]
    tried = ", ".join(str(c) for c in cands[:4]) + (", ..." if len(cands) > 4 else "")
    hint = "" if datadir is not None else "; use --datadir DIR to say where the stacks are"
    raise InputError(f"image stack {raw!r} not found (tried {tried}){hint}", source)
