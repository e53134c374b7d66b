"""Makes docs/demo.png, the README's picture of the demo page.

Serves the embedded 270M on a free port of 127.0.0.1 as `gemma-kit demo` does (a pretrained
model: the text-completion page), has Debian's chromium (driven by Playwright) write the
beginning of a story and press Continue with a fixed seed, and saves the page. Needs the [demo]
and [test] extras and /usr/bin/chromium.

    python demos/screenshot.py [--out docs/demo.png] [--seed 3]
"""

from __future__ import annotations

import argparse
import pathlib
import socket

from playwright.sync_api import sync_playwright

import gemma_kit
from gemma_kit.demo import ChatApp

ROOT = pathlib.Path(__file__).resolve().parent.parent
BEGINNING = "Once upon a time, in a small village by the sea,"
MAX_NEW = 96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo.png"))
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = gemma_kit.default_model()
    app = ChatApp(model, tokenizer, mode="completion", kind="pretrained")
    app.warm_up(max_new_tokens=MAX_NEW)  # so that the page shows steady-state speed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = app.launch("127.0.0.1", port, block=False, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path="/usr/bin/chromium",
                headless=True,
                args=["--no-sandbox", "--disable-background-networking"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300_000)
            page.goto(url)
            for name, value in (("max-new", MAX_NEW), ("seed", args.seed)):
                page.fill(f"#{name} input[type=number]", str(value))
                page.press(f"#{name} input[type=number]", "Enter")
            page.fill("#text textarea", BEGINNING)
            page.click("#continue")
            page.wait_for_selector("#stats:has-text('Continuation 1:')")
            page.wait_for_selector("#text textarea:not([disabled])")
            page.mouse.move(0, 0)  # no button under the pointer
            page.wait_for_timeout(500)  # the buttons' transitions
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
