"""The README's picture of ``anysize serve``: the embedded default model on this machine's CPU, the demo's
prompts from the page's form in headless Chromium (Debian's, driven by Playwright): a screenshot with
the first job done and the second in stage 2, written to docs/serve.png.

    .venv/bin/python tools/serve_screenshot.py [-o docs/serve.png]
"""
import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import PIL.Image
import uvicorn
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anysize import cli, serve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="docs/serve.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = serve.Server(cli.commands(), Path(tmp) / "images")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        app = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="warning"))
        thread = threading.Thread(target=app.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not app.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        shots = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 960})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').options.length > 0")
            for prompt, seed in (("two large red circles and a small blue triangle on grass", 3),
                                 ("a small yellow star above a big green square on sand", 5)):
                page.fill("#prompt", prompt)
                page.fill("#width", "768")
                page.fill("#height", "384")
                page.fill("#seed", str(seed))
                page.fill("#guidance", "4")
                page.fill("#upscale_guidance", "1")
                page.click("#generate")
            page.wait_for_selector("#job-1.done", timeout=600_000)
            page.wait_for_selector("#job-2.running .desc:text-matches('stage 2')", timeout=600_000)
            page.wait_for_function("document.querySelector('#job-2 progress').value > 0", timeout=600_000)
            page.wait_for_function("document.querySelector('#job-1 img').naturalWidth > 0")
            page.evaluate("document.querySelector('#job-1 details').open = true")
            path = Path(tmp) / "page.png"
            page.screenshot(path=path)
            shots.append(PIL.Image.open(path).convert("RGB"))
            browser.close()
        app.should_exit = True  # cancels job 2 at its next tile
        thread.join()
    shots[0].save(args.output, optimize=True)
    print(args.output)


if __name__ == "__main__":
    main()
