"""Render an HTML file in headless Chromium through the DevTools protocol over a pipe
(`--remote-debugging-pipe`: no websocket library, no open port) and report what a person would
see: console errors, images that did not decode, page width, and a screenshot.

    python tests/_chromium.py report.html shot.png [WIDTH]
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Chromium with the DevTools protocol on file descriptors 3 (commands) and 4 (replies)."""

    def __init__(self, executable: str, timeout: float = 60.0) -> None:
        self.timeout, self.next_id, self.events = timeout, 0, []
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="selfsup-chromium-")
        args = [
            executable,
            "--headless",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to sandbox as root (CI containers)

        def fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.process = subprocess.Popen(
            args,
            pass_fds=(to_chrome_r, from_chrome_w, 3, 4),  # 3, 4 once preexec_fn dup2-ed them
            preexec_fn=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer = b""

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float | None = None) -> dict[str, Any]:
        for i, e in enumerate(self.events):
            if e.get("method") == event:
                return self.events.pop(i)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self._read_message(deadline)
            if message.get("method") == event:
                return message
            self.events.append(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing anyway
            self.send("Browser.close")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


CHECK = """(() => {
  const imgs = Array.from(document.images);
  const texts = Array.from(document.querySelectorAll('p,li,td,th,pre,h1,h2,h3,figcaption'));
  return JSON.stringify({
    images: imgs.map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt})),
    pageWidth: document.documentElement.scrollWidth,
    viewport: window.innerWidth,
    wideText: texts.filter(t => !t.closest('.scroll') && t.getBoundingClientRect().right >
                                window.innerWidth + 1).map(t => t.tagName + ': ' +
                                t.textContent.slice(0, 60)),
    height: document.documentElement.scrollHeight,
  });
})()"""


ERRORS = ("error", "assert")


def render(path: Path, width: int = 1280, height: int = 900) -> dict[str, Any]:
    """Open `path` at `width` CSS pixels; returns the console errors, the images' decoded sizes,
    the page's scroll width, text wider than the screen and a PNG screenshot of the first screen."""
    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("no Chromium found")
    browser = Browser(executable)
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session)
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )
        browser.send("Page.navigate", session, url=path.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        result = browser.send(
            "Runtime.evaluate", session, expression=CHECK, returnByValue=True, awaitPromise=True
        )
        state = json.loads(result["result"]["value"])
        shot = browser.send("Page.captureScreenshot", session, format="png")
        errors = []
        for e in browser.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ERRORS:
                errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", ""))
        state["console_errors"] = errors
        state["screenshot"] = base64.b64decode(shot["data"])
        return state
    finally:
        browser.close()


if __name__ == "__main__":
    width = int(sys.argv[3]) if len(sys.argv) > 3 else 1280
    state = render(Path(sys.argv[1]), width=width)
    Path(sys.argv[2]).write_bytes(state.pop("screenshot"))
    state["images"] = (
        f"{len(state['images'])} images, widths {[i['width'] for i in state['images']]}"
    )
    print(json.dumps(state, indent=1))
