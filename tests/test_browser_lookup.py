"""How the browser tests find Chromium: $CHROMIUM, then PATH; none: skipped with the way to get
one, or failed where CI asks for a browser (SIPAK_REQUIRE_BROWSER=1)."""

import functools
import os
import shutil

import pytest

from tests.browser import HOW_TO_GET_ONE, chromium_or_skip, find_chromium


def _exe(path):
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def _which_in(folder):
    """`shutil.which` with PATH set to `folder` only."""
    return functools.partial(shutil.which, path=str(folder))


def test_chromium_from_the_environment_comes_first(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "chromium")
    mine = _exe(tmp_path / "my-chrome")
    assert find_chromium({"CHROMIUM": mine}, _which_in(bin_dir)) == mine


def test_each_name_on_path_is_tried(tmp_path):
    for name in ("chromium-browser", "google-chrome"):
        bin_dir = tmp_path / name
        bin_dir.mkdir()
        found = _exe(bin_dir / name)
        assert find_chromium({}, _which_in(bin_dir)) == found
        assert chromium_or_skip({}, _which_in(bin_dir)) == found


def test_no_browser_skips_with_the_way_to_get_one(tmp_path):
    with pytest.raises(pytest.skip.Exception) as info:
        chromium_or_skip({}, _which_in(tmp_path))
    msg = str(info.value)
    assert msg == HOW_TO_GET_ONE
    assert "apt-get install chromium" in msg and "CHROMIUM=/path/to/chromium" in msg
    with pytest.raises(pytest.skip.Exception):
        chromium_or_skip({"SIPAK_REQUIRE_BROWSER": "0"}, _which_in(tmp_path))


def test_no_browser_fails_where_ci_requires_one(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        chromium_or_skip({"SIPAK_REQUIRE_BROWSER": "1"}, _which_in(tmp_path))


def test_a_wrong_chromium_variable_fails_naming_it(tmp_path):
    missing = str(tmp_path / "nope")
    not_exe = tmp_path / "plain"
    not_exe.write_text("")
    for given in (missing, str(not_exe)):
        with pytest.raises(pytest.fail.Exception, match=f"CHROMIUM={given} is not an executable"):
            chromium_or_skip({"CHROMIUM": given}, _which_in(tmp_path))


def test_the_default_lookup_reads_the_real_environment(monkeypatch, tmp_path):
    mine = _exe(tmp_path / "chrome-here")
    monkeypatch.setenv("CHROMIUM", mine)
    assert find_chromium() == mine
    monkeypatch.delenv("CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert os.environ["PATH"] == str(tmp_path)
    assert find_chromium() is None
