"""The report's PNG: headless Chromium run on the HTML file, or False without one."""

from __future__ import annotations

from llmrec_spark.evaluation.screenshot import screenshot


def test_screenshot_without_chromium_returns_false(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert screenshot(str(tmp_path / "r.html"), str(tmp_path / "r.png")) is False


def test_screenshot_runs_headless_chromium_on_the_file(tmp_path, monkeypatch):
    # A stand-in chromium that writes the PNG it is asked for and records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "chromium"
    fake.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$@" > "${0%/*}/args.txt"\n'
        'for a in "$@"; do case "$a" in --screenshot=*) printf PNG > "${a#--screenshot=}";; '
        "esac; done\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    html_path = tmp_path / "r.html"
    html_path.write_text("<p>hi</p>")

    assert screenshot(str(html_path), str(tmp_path / "r.png"), height=1200) is True

    args = (bin_dir / "args.txt").read_text().split("\n")
    assert (tmp_path / "r.png").read_bytes() == b"PNG"
    assert {"--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200"} <= set(args)
    assert f"file://{html_path}" in args
    assert any(a.startswith("--user-data-dir=") for a in args)
