"""Find (or install) a headless Chromium for the report tests."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """Path of a Chromium binary; installs Debian's package when missing (root only), else skips."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get).")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True,
                       timeout=900, env=env)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"Chromium could not be installed: {exc}")
    path = shutil.which("chromium")
    if not path:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH.")
    return path


def screenshot(html_path, png_path, tmp_path, size=(1200, 2000)) -> None:
    exe = chromium()
    cmd = [exe, *_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
           f"--window-size={size[0]},{size[1]}", f"--screenshot={png_path}", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not png_path.exists():
        raise AssertionError(f"Chromium wrote no screenshot: {proc.stderr[-2000:]}")
