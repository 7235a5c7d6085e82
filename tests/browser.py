"""Where the browser tests find Chromium, and what they say when there is none (not a test
module; conftest.py's `chromium` fixture uses it).

The README's test command must pass on a machine without a browser: the browser test is then
skipped with the way to get one. CI (`.ci/run`) installs Chromium and sets
SIPAK_REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import os
import shutil

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
REQUIRE_ENV = "SIPAK_REQUIRE_BROWSER"
HOW_TO_GET_ONE = (
    "no Chromium found ($CHROMIUM is not set; none of "
    + ", ".join(NAMES)
    + " is on PATH). Install one with `apt-get install chromium` (Debian/Ubuntu; what .ci/run "
    "does) or point the tests at one with CHROMIUM=/path/to/chromium"
)


def find_chromium(environ=os.environ, which=shutil.which) -> str | None:
    """$CHROMIUM if set (it must name an executable), else the first of `NAMES` on PATH."""
    given = environ.get("CHROMIUM")
    if given:
        found = which(given)
        if not found:
            raise FileNotFoundError(
                f"CHROMIUM={given} is not an executable (a path, or a name on PATH); fix or "
                "unset it"
            )
        return found
    for name in NAMES:
        found = which(name)
        if found:
            return found
    return None


def chromium_or_skip(environ=os.environ, which=shutil.which) -> str:
    """The browser's path. None found: the calling test is skipped with `HOW_TO_GET_ONE`, or
    fails when $SIPAK_REQUIRE_BROWSER is set to anything but '' or '0' (CI). A $CHROMIUM that
    names no executable always fails: the user asked for that browser."""
    try:
        path = find_chromium(environ, which)
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    if path:
        return path
    if environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{HOW_TO_GET_ONE} ({REQUIRE_ENV} makes this a failure)", pytrace=False)
    pytest.skip(HOW_TO_GET_ONE)
