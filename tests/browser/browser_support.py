"""What the real-browser tests share: the `browser` mark (a loud skip without Chromium) and the screenshot folder;
the Chromium driver and the served dashboard come from `bench.browser`, which the click-to-result benchmark uses
too. Needs Debian's `chromium` and `chromium-driver` (`make system-deps`)."""

from __future__ import annotations

import warnings

import pytest

from bench.browser import CHROMEDRIVER, CHROMIUM, ROOT, chromium, dashboard, free_port, wait_healthy

__all__ = ["ROOT", "SHOTS", "browser_marks", "chromium", "dashboard", "free_port", "wait_healthy"]

SHOTS = ROOT / "artifacts" / "screenshots"


def browser_marks() -> list:
    """The marks of a browser test module: `browser`, and a loud skip where Chromium is not installed."""
    if CHROMIUM and CHROMEDRIVER:
        return [pytest.mark.browser]
    reason = ("BROWSER TESTS SKIPPED: chromium or chromedriver is not installed. Install Debian's `chromium` and "
              "`chromium-driver` (`make system-deps`, as root) — CI does.")
    warnings.warn(reason, stacklevel=2)
    return [pytest.mark.browser, pytest.mark.skip(reason=reason)]
