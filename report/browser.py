"""Render a report in headless Chromium (Debian's `chromium`, `make chromium` installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from report.queries import ReportError

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
RENDER_TIMEOUT_S = 120.0

# Offline and quiet: no sandbox (we run as root in CI), no GPU, nothing fetched in the background.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")


def chromium_path() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _run(html: Path, *args: str) -> subprocess.CompletedProcess:
    chromium = chromium_path()
    if chromium is None:
        raise ReportError("chromium not found: `make chromium` installs Debian's chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        completed = subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, html.resolve().as_uri()],
                                   capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    if completed.returncode != 0:
        raise ReportError(f"chromium exited with {completed.returncode}:\n{completed.stderr[-2000:]}")
    return completed


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 2000) -> Path:
    """The first width x height pixels of the page as a PNG."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    _run(html, f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    if not png.is_file():
        raise ReportError(f"chromium did not write {png}")
    return png


def dump_dom(html: Path) -> str:
    """The page's DOM after Chromium loaded it."""
    return _run(html, "--dump-dom").stdout
