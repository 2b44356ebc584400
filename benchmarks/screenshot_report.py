"""Screenshot a report.html (or render a report.json first) with headless Chromium.

    python benchmarks/screenshot_report.py runs/x/report.html reports/report-html.png [--width 1280] [--height 3000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The first Chromium-family executable on PATH."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def html_for(source: Path, tmp: Path) -> Path:
    """`source` itself for HTML; for a report.json, its rendering written under `tmp`."""
    if source.suffix != ".json":
        return source
    import json

    from compress.report import render_html

    page = tmp / "report.html"
    page.write_text(render_html(json.loads(source.read_text())), encoding="utf-8")
    return page


def screenshot(html: Path, out: Path, *, width: int = 1280, height: int = 3000, timeout: float = 120.0) -> None:
    """Render `html` in headless Chromium at width x height CSS pixels and write a PNG to `out`."""
    browser = find_browser()
    if browser is None:
        raise SystemExit("error: chromium not found on PATH; install it (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--force-device-scale-factor=1",
               f"--window-size={width},{height}", f"--screenshot={out.resolve()}", html.resolve().as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: chromium did not finish within {timeout:g} s") from None
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: chromium exited {done.returncode} without writing {out}: {last}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="report.html, or a report.json to render first")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before giving up on chromium")
    args = parser.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"error: {args.source} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        screenshot(html_for(args.source, Path(tmp)), args.out, width=args.width, height=args.height,
                   timeout=args.timeout)
    print(args.out)


if __name__ == "__main__":
    sys.exit(main())
