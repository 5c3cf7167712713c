"""Helpers for tests of HTML reports: the page's image sources and PNG checks."""

from __future__ import annotations

import html.parser
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.links: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"] or "")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")
        if tag == "script":
            self.scripts += 1


def _parse(page: Path) -> _Tags:
    parser = _Tags()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def image_sources(page: Path) -> tuple[list[Path], int]:
    """The files the page's ``<img>`` tags show (all relative paths) and its script count."""
    parser = _parse(page)
    for src in parser.sources:
        assert "://" not in src and not src.startswith("/"), f"non-relative image path {src}"
    return [page.parent / urllib.parse.unquote(s) for s in parser.sources], parser.scripts


def link_targets(page: Path) -> list[Path]:
    """The files the page's ``<a href>`` links point to (all relative paths)."""
    parser = _parse(page)
    for href in parser.links:
        assert "://" not in href and not href.startswith("/"), f"non-relative link {href}"
    return [page.parent / urllib.parse.unquote(h) for h in parser.links]


def check_png(path: Path) -> None:
    """``path`` is a PNG larger than 100 px each way, not blank, with more than 10 colours."""
    import matplotlib.image

    assert path.is_file(), f"{path} missing"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = np.asarray(matplotlib.image.imread(path), dtype=np.float64)  # (H, W, 3|4) in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    rgb = pixels[..., :3]
    assert rgb.std() > 0.01, f"{path} is blank"
    q = (rgb * 255).round().astype(np.int64)
    colours = np.unique(q[..., 0] * 65536 + q[..., 1] * 256 + q[..., 2])
    assert len(colours) > 10, f"{path} has only {len(colours)} colours"


def chromium() -> str | None:
    """Path of a chromium binary on PATH, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_chromium(browser: str, page: Path, tmp_path: Path) -> None:
    """Open ``page`` in headless ``browser``: it exits 0, logs no uncaught script error and no
    failed load of the page's own files, and its screenshot is a non-blank PNG."""
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
           "--window-size=1200,2000", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr.splitlines()
    assert not [line for line in log if "Uncaught" in line]
    own = str(page.parent.resolve())
    assert not [line for line in log if "Failed to load resource" in line and own in line]
    check_png(shot)
