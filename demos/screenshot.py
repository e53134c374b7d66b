"""Makes docs/demo.png, the README's picture of the chat page.

Serves the embedded 270M on a free port of 127.0.0.1, has Debian's chromium (driven by
Playwright) send two messages with a fixed seed, and saves the page. Needs the [demo] and [test]
extras and /usr/bin/chromium.

    python demos/screenshot.py [--out docs/demo.png]
"""

from __future__ import annotations

import argparse
import pathlib
import socket

from playwright.sync_api import sync_playwright

import gemma_kit
from gemma_kit.demo import ChatApp

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESSAGES = ("Write a haiku about the sea.", "Now one about mountains.")
MAX_NEW = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = gemma_kit.default_model()
    app = ChatApp(model, tokenizer)
    app.warm_up(max_new_tokens=MAX_NEW)  # so that the page shows steady-state speed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = app.launch("127.0.0.1", port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.fill("#system textarea", "You are a poet. Answer in verse.")
            for name, value in (("max-new", MAX_NEW), ("seed", args.seed)):
                page.fill(f"#{name} input[type=number]", str(value))
                page.press(f"#{name} input[type=number]", "Enter")
            for number, message in enumerate(MESSAGES, 1):
                page.fill("#message textarea", message)
                page.press("#message textarea", "Enter")
                page.wait_for_selector(f"#stats:has-text('Reply {number}:')")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
