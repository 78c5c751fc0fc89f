"""A PNG of an HTML report by headless Chromium, when one is installed (`make screenshot`)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile

log = logging.getLogger(__name__)


def screenshot(html_path: str, png_path: str, *, width: int = 1400, height: int = 3000) -> bool:
    """Render `html_path` to `png_path` with headless Chromium; False when none is on PATH.

    Only the first `height` pixels are captured (headless Chromium has no full-page flag).
    """
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        return False
    if os.path.exists(png_path):
        os.remove(png_path)
    with tempfile.TemporaryDirectory(prefix="llmrec-chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={os.path.abspath(png_path)}",
            f"--window-size={width},{height}",
            "file://" + os.path.abspath(html_path),
        ]
        try:
            # Chromium may exit non-zero over missing D-Bus while the PNG is fine: judge the file.
            subprocess.run(command, capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("screenshot of %s failed: %s", html_path, exc)
    return os.path.exists(png_path) and os.path.getsize(png_path) > 0
