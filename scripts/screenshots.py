"""Screenshots of the dashboard for the README, taken on the demo's store.

    .venv/bin/python scripts/screenshots.py            # runs the demo into a temporary store
    .venv/bin/python scripts/screenshots.py --store sqlite:///interplay.db

Writes docs/dashboard-flows.png, docs/dashboard-flow.png and docs/dashboard-map.png.
Needs the dev extra (playwright) and Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def interplay(*args: str) -> list[str]:
    """The command line of ``interplay ARGS`` with this interpreter."""
    return [sys.executable, "-m", "interplay", *args]


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Wait until ``url`` answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    """Fill a store (unless given), serve the dashboard, take the pictures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="a store filled by `interplay demo` (default: run the demo now)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where the PNGs go")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERPLAY_")}
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or f"sqlite:///{Path(tmp) / 'demo.db'}"
        if not args.store:
            subprocess.run(interplay("demo", "--store", store), check=True, env=env, cwd=REPO,
                           stdout=subprocess.DEVNULL)
        port = free_port()
        server = subprocess.Popen(
            interplay("dashboard", "--store", store, "--port", str(port), "--app", "interplay.examples.orders:app"),
            env=env, cwd=REPO, stdout=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/flows")
            shoot(base, store, Path(args.out))
        finally:
            server.terminate()
            server.wait(10)


def shoot(base: str, store: str, out: Path) -> None:
    """Take the three screenshots."""
    out.mkdir(parents=True, exist_ok=True)
    path = store.removeprefix("sqlite:///")
    db = sqlite3.connect(path)
    try:  # the richest flow: a saga that compensated
        row = db.execute("SELECT flow_id FROM ip_flows WHERE status = 'compensated' LIMIT 1").fetchone()
    finally:
        db.close()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 820}, device_scale_factor=1)
        page.goto(base + "/flows")
        page.screenshot(path=str(out / "dashboard-flows.png"), full_page=True)
        page.goto(base + f"/flow?id={row[0]}")
        page.locator("ul.tree details.payload").first.evaluate("d => d.open = true")
        page.screenshot(path=str(out / "dashboard-flow.png"), full_page=True)
        page.goto(base + "/map")
        top = page.locator("main h1").bounding_box()
        box = page.locator("div.map-box").bounding_box()
        assert top is not None
        assert box is not None
        page.set_viewport_size({"width": 1280, "height": int(box["y"] + box["height"] + 20)})
        page.screenshot(path=str(out / "dashboard-map.png"), clip={
            "x": 0, "y": top["y"] - 12, "width": 1280, "height": box["y"] + box["height"] - top["y"] + 24})
        browser.close()
    for name in ("dashboard-flows.png", "dashboard-flow.png", "dashboard-map.png"):
        print(out / name)


if __name__ == "__main__":
    main()
