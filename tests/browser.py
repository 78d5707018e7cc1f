"""A small WebDriver client: headless Chromium driven by chromedriver, over HTTP with httpx.

Only what the browser tests use: a session, navigating, finding elements by CSS, clicking,
typing, running scripts, waiting for a condition, reloading, screenshots.
(The W3C WebDriver protocol: https://www.w3.org/TR/webdriver2/.)
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the key of an element reference
ENTER = "\ue007"

ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def missing() -> str | None:
    """Why the browser can't run here, or None when it can."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if absent:
        return (
            f"headless Chromium is not installed ({', '.join(absent)} missing):"
            " apt-get install chromium chromium-driver"
        )
    return None


class WebDriverError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Element:
    def __init__(self, browser: Browser, element_id: str, selector: str) -> None:
        self.browser, self.id, self.selector = browser, element_id, selector

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self.browser._call(method, f"/element/{self.id}{path}", body)

    def click(self) -> None:
        self._call("POST", "/click", {})

    def clear(self) -> None:
        self._call("POST", "/clear", {})

    def type(self, text: str) -> None:
        """Type `text` into it as a person would, key by key (ENTER presses Enter)."""
        self._call("POST", "/value", {"text": text})

    @property
    def text(self) -> str:
        """Its rendered text."""
        return self._call("GET", "/text")

    def prop(self, name: str) -> Any:
        return self._call("GET", f"/property/{name}")

    def attribute(self, name: str) -> str | None:
        return self._call("GET", f"/attribute/{name}")

    @property
    def enabled(self) -> bool:
        return self._call("GET", "/enabled")


class Browser:
    """One headless Chromium session, with its own chromedriver and profile directory."""

    def __init__(self, width: int = 1200, height: int = 900, timeout: float = 30) -> None:
        self._profile = tempfile.mkdtemp(prefix="chatterd-chromium-")
        self.port = _free_port()
        self._log = open(Path(self._profile) / "chromedriver.log", "wb")
        self._driver = subprocess.Popen(
            [str(CHROMEDRIVER), f"--port={self.port}"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout)
        self.session: str | None = None
        try:
            self._wait_for_driver()
            options = {
                "binary": str(CHROMIUM),
                "args": [
                    *ARGS,
                    f"--user-data-dir={self._profile}/profile",
                    f"--window-size={width},{height}",
                ],
            }
            answer = self._request(
                "POST",
                "/session",
                {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}},
            )
            self.session = answer["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _wait_for_driver(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._driver.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self._driver.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if self._http.get("/status").json()["value"].get("ready"):
                    return
            time.sleep(0.05)
        raise WebDriverError(f"chromedriver did not start in {timeout} s")

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        response = self._http.request(method, path, json=body)
        value = response.json().get("value")
        if response.status_code != 200:
            detail = value.get("message", value) if isinstance(value, dict) else value
            error = value.get("error", "") if isinstance(value, dict) else ""
            raise WebDriverError(f"{method} {path}: {error}: {detail}")
        return value

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self._request(method, f"/session/{self.session}{path}", body)

    # Pages

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def refresh(self) -> None:
        self._call("POST", "/refresh", {})

    @property
    def url(self) -> str:
        return self._call("GET", "/url")

    def set_window(self, width: int, height: int) -> None:
        self._call("POST", "/window/rect", {"width": width, "height": height})

    # Elements

    def find(self, selector: str) -> Element:
        found = self._call("POST", "/element", {"using": "css selector", "value": selector})
        return Element(self, found[ELEMENT], selector)

    def find_all(self, selector: str) -> list[Element]:
        found = self._call("POST", "/elements", {"using": "css selector", "value": selector})
        return [Element(self, item[ELEMENT], selector) for item in found]

    def text(self, selector: str) -> str:
        return self.find(selector).text

    # Scripts

    def run(self, script: str, *args: Any) -> Any:
        """Run `script` as a function body in the page (`arguments` holds args); its result."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def run_async(self, script: str, *args: Any) -> Any:
        """Run `script` with a callback as its last argument; what it calls back with."""
        return self._call("POST", "/execute/async", {"script": script, "args": list(args)})

    def wait(
        self, condition: str | Callable[[], Any], *args: Any, timeout: float = 10, what: str = ""
    ) -> Any:
        """Poll until `condition` (a script's body, or a function) is truthy; return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition() if callable(condition) else self.run(condition, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
            time.sleep(0.02)

    def screenshot(self) -> bytes:
        """The viewport as PNG."""
        return base64.b64decode(self._call("GET", "/screenshot"))

    def session_storage(self) -> dict[str, str]:
        return self.run(
            "const o = {}; for (let i = 0; i < sessionStorage.length; i++)"
            " { const k = sessionStorage.key(i); o[k] = sessionStorage.getItem(k); } return o;"
        )

    def quit(self) -> None:
        if self.session is not None:
            with contextlib.suppress(httpx.HTTPError, WebDriverError):
                self._request("DELETE", f"/session/{self.session}")
            self.session = None
        if self._driver.poll() is None:
            self._driver.terminate()
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                self._driver.kill()
                self._driver.wait()
        self._http.close()
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def driver_log(self) -> str:
        return (Path(self._profile) / "chromedriver.log").read_text(errors="replace")

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quit()
