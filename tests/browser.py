"""Headless Chromium from Debian's packages for page tests: installed on first use where this is root with
apt-get (as the SLURM test installs its daemons), else the tests skip with the reason."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

_CANDIDATES = ("chromium", "chromium-browser")


def chromium() -> tuple[str | None, str]:
    """(path of the browser, '') or (None, why there is none)."""
    found = next((shutil.which(c) for c in _CANDIDATES if shutil.which(c)), None)
    if found:
        return found, ""
    if os.geteuid() != 0:
        return None, "chromium is not installed, and installing it needs root"
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            return None, f"could not install chromium ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}"
    found = next((shutil.which(c) for c in _CANDIDATES if shutil.which(c)), None)
    return (found, "") if found else (None, "apt-get installed chromium but it is not on PATH")


def _flags(browser: str) -> list[str]:
    flags = [browser, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
    return flags + (["--no-sandbox"] if os.geteuid() == 0 else [])  # as root Chromium refuses its sandbox


def rendered_body(browser: str, page: Path, fragment: str = "", size: str = "1500,1000") -> dict[str, str]:
    """The ``data-*`` attributes of <body> after the page's scripts ran, in a window of ``size`` pixels (a
    desktop's: panels side by side)."""
    out = subprocess.run([*_flags(browser), f"--window-size={size}", "--dump-dom",
                          page.resolve().as_uri() + fragment],
                         capture_output=True, text=True, timeout=180)
    body = re.search(r"<body([^>]*)>", out.stdout)
    if body is None:
        raise AssertionError(f"no <body> in Chromium's DOM dump: {out.stderr[-500:]}")
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))


def screenshot(browser: str, page: Path, png: Path, size: str = "1300,1600") -> Path:
    subprocess.run([*_flags(browser), f"--window-size={size}", f"--screenshot={png}", page.resolve().as_uri()],
                   capture_output=True, text=True, timeout=180, check=True)
    return png
