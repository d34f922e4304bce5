"""The report as a real browser shows it: full-height screenshots at given widths, and a check
that nothing makes the page wider than the screen.

Drives the system's headless Chromium through its DevTools protocol over a pipe
(``--remote-debugging-pipe``: JSON messages separated by NUL bytes on file descriptors 3 and 4),
so it needs no browser download and no package beyond the standard library::

    python tests/report_check.py processed/report/index.html --widths 1280,390 --out processed/report

writes ``screenshot-1280.png`` and ``screenshot-390.png`` and exits 1, naming the widest
elements, when the document at some width is wider than the viewport. `make report-check` runs it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-pipe",
)
TIMEOUT = 60.0  # seconds for any one answer of the browser

# Elements that stick out of the viewport, widest first, unless a scrolling box holds them
# (a table inside an `overflow-x: auto` wrapper may be wide: the page is not).
OVERFLOWING = """(() => {
  const width = document.documentElement.clientWidth;
  const scrolls = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const s = getComputedStyle(p).overflowX; if (s === 'auto' || s === 'scroll' || s === 'hidden') return true; }
    return false; };
  const out = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.right > width + 1 && !scrolls(el))
      out.push([Math.round(r.right), el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                (el.className && typeof el.className === 'string' ? '.' + el.className.trim().split(/\\s+/).join('.') : '')]);
  }
  out.sort((a, b) => b[0] - a[0]);
  return JSON.stringify({scrollWidth: document.documentElement.scrollWidth, clientWidth: width,
                         height: document.documentElement.scrollHeight, overflowing: out.slice(0, 5)});
})()"""


@dataclass
class Page:
    width: int
    scroll_width: int
    height: int
    overflowing: list
    screenshot: Path | None

    @property
    def too_wide(self) -> bool:
        return self.scroll_width > self.width


class Browser:
    """One headless Chromium, spoken to over its DevTools pipe."""

    def __init__(self, executable: str = "chromium"):
        found = shutil.which(executable)
        if found is None:
            raise RuntimeError(f"{executable} not found: install it (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="report-check-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def fds():  # the browser reads commands on fd 3 and writes answers to fd 4
            import fcntl

            # copies numbered 10 and up first, so neither end is already 3 or 4 (dup2 onto itself
            # would leave it closed on exec)
            read_end, write_end = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [found, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4),  # kept open when the child closes the rest
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, event: str, session: str) -> None:
        while True:
            for i, seen in enumerate(self.events):
                if seen.get("method") == event and seen.get("sessionId") == session:
                    del self.events[: i + 1]
                    return
            self.events.append(self._read())

    def _read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the browser stopped answering")
            import select

            ready, _, _ = select.select([self._from_browser], [], [], 1.0)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise RuntimeError("the browser closed its pipe")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str, width: int, screenshot: Path | None) -> Page:
        """Load ``url`` in a viewport ``width`` px wide (a phone's below 600), measure the
        document, and save a screenshot of its whole height."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        try:
            mobile = width < 600
            self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=900,
                      deviceScaleFactor=1, mobile=mobile)
            self.call("Page.enable", session)
            self.call("Page.navigate", session, url=url)
            self.wait_for("Page.loadEventFired", session)
            value = self.call("Runtime.evaluate", session, expression=OVERFLOWING, returnByValue=True)
            facts = json.loads(value["result"]["value"])
            if screenshot is not None:
                shot = self.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                                 clip={"x": 0, "y": 0, "width": max(width, facts["scrollWidth"]),
                                       "height": facts["height"], "scale": 1})
                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return Page(width, facts["scrollWidth"], facts["height"], facts["overflowing"], screenshot)
        finally:
            self.call("Target.closeTarget", targetId=target)

    def close(self) -> None:
        with_suppress = (OSError, RuntimeError)
        try:
            self.call("Browser.close")
        except with_suppress:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def check(page: Path, widths: list[int], out: Path | None) -> list[Page]:
    """Each width's measurements (and screenshot in ``out``)."""
    url = page.resolve().as_uri()
    with Browser() as browser:
        return [browser.open(url, w, out / f"screenshot-{w}.png" if out else None) for w in widths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--widths", default="1280,390", help="viewport widths in px, comma-separated")
    parser.add_argument("--out", type=Path, help="folder for screenshot-<width>.png [default: the page's]")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"report-check: {args.page} does not exist; run `prep report` first", file=sys.stderr)
        return 2
    widths = [int(w) for w in args.widths.split(",")]
    try:
        pages = check(args.page, widths, args.out or args.page.parent)
    except RuntimeError as err:
        print(f"report-check: {err}", file=sys.stderr)
        return 2
    failed = False
    for p in pages:
        verdict = "too wide" if p.too_wide else "fits"
        print(f"{p.width:>5} px: document {p.scroll_width} px wide, {p.height} px tall: {verdict}; {p.screenshot}")
        if p.too_wide:
            failed = True
            for right, element in p.overflowing:
                print(f"        {element} reaches {right} px", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
