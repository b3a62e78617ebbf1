"""The site in a real browser: headless Chromium driven over its DevTools protocol (a small
WebSocket client written here on the standard library). Every page loads from file:// without
a console error or a failed load, images have a size, links resolve, a neuron page shows its
examples, the search finds a neuron and a token, the layered graph draws its nodes.

Skipped where Chromium is absent (Debian: `apt-get install -y chromium`). Set NWH_SITE_SHOTS to
a folder to keep the screenshots of the index and of a neuron page there."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_site import EXAMPLES, build_warehouse, nwh

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                              "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium: "
                                "apt-get install -y chromium (Debian)")


class WebSocket:
    """A client WebSocket (RFC 6455) for text frames: enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the browser closed the connection during the handshake")
            head += chunk
        status, _, self.buffer = head.partition(b"\r\n\r\n")
        if b" 101 " not in status.split(b"\r\n")[0]:
            raise ConnectionError(f"no WebSocket upgrade: {status[:80]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the browser closed the connection")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        data = text.encode()
        head = bytes([0x81])
        n = len(data)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("the browser closed the WebSocket")
            if opcode == 0x9:  # ping
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self) -> None:
        self.sock.close()


class Browser:
    """Headless Chromium with one page, driven by DevTools commands."""

    def __init__(self, profile: Path):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--hide-scrollbars", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("headless Chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = []
        while not targets and time.time() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            time.sleep(0.1)
        self.ws = WebSocket(targets[0]["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events: list[dict] = []
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        for k, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(k)
        while time.time() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def open(self, path: Path) -> list[str]:
        """Load a page; the console errors, exceptions and failed loads it caused."""
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired")
        self.eval("1")  # let pending console and log events arrive
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception") + " " +
                              str(p["exceptionDetails"].get("exception", {}).get("description")))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error",
                                                                                     "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description")))
                                       for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        return errors

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path, height: int = 2400) -> Path:
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=height,
                  deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        self.call("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def site(tmp_path_factory, micro_model_dir, corpus_file) -> Path:
    root = tmp_path_factory.mktemp("browser") / "s"
    storage = build_warehouse(root, micro_model_dir, corpus_file, full=False)
    assert nwh("site", "--storage", str(storage.root), "--top", "4", "--examples",
               str(EXAMPLES), "--quiet") == 0
    return storage.reports("site")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


ELEMENTS_WITH_REFS = ("Array.from(document.querySelectorAll('a[href], img[src], script[src], "
                      "link[href]')).map(e => e.href || e.src)")


def test_every_page_loads_cleanly_with_sized_images_and_resolving_links(site, browser):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 8
    for page in pages:
        errors = browser.open(page)
        assert errors == [], f"{page.relative_to(site)}: {errors}"
        sizes = browser.eval("Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
                             "i.naturalHeight, i.getBoundingClientRect().width])")
        for complete, w, h, shown in sizes:
            assert complete and w > 0 and h > 0 and shown > 0, page
        for ref in browser.eval(ELEMENTS_WITH_REFS):
            parts = urllib.parse.urlsplit(ref)
            if parts.scheme == "file":
                target = Path(urllib.parse.unquote(parts.path))
                assert target.exists(), f"{page.relative_to(site)} -> {ref}"
            else:
                assert parts.scheme in ("data", "about"), ref  # nothing from the network
        assert browser.eval("typeof window.panzoom") == "function"


def test_neuron_page_shows_its_examples_shaded(site, browser):
    page = sorted((site / "neurons" / "dense").glob("*.html"))[0]
    assert browser.open(page) == []
    assert browser.eval("document.querySelectorAll('tr.example').length") == EXAMPLES
    shaded = browser.eval("Array.from(document.querySelectorAll('tr.example .tok')).filter("
                          "s => getComputedStyle(s).backgroundColor !== 'rgba(0, 0, 0, 0)')"
                          ".length")
    assert shaded > 0
    assert browser.eval("document.querySelector('#examples').getBoundingClientRect().top") < \
        browser.eval("document.querySelector('#distribution').getBoundingClientRect().top")
    shots = os.environ.get("NWH_SITE_SHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        assert browser.screenshot(Path(shots) / "test-neuron.png").stat().st_size > 10_000
        browser.open(site / "index.html")
        assert browser.screenshot(Path(shots) / "test-index.png").stat().st_size > 10_000


def test_search_finds_a_neuron_and_a_token(site, browser):
    assert browser.open(site / "index.html") == []
    page = sorted((site / "neurons" / "dense").glob("*.html"))[0]
    layer, neuron = page.stem[1:].split("_N")
    browser.eval("(() => { const i = document.getElementById('search-neuron'); "
                 f"i.value = '{layer}/{neuron}'; i.dispatchEvent(new Event('input')); }})()")
    hrefs = browser.eval("Array.from(document.querySelectorAll('#search-results a'))"
                         ".map(a => a.href)")
    assert page.resolve().as_uri() in hrefs
    browser.eval("(() => { const i = document.getElementById('search-neuron'); "
                 "i.value = '0/999'; i.dispatchEvent(new Event('input')); })()")
    assert "neurons 0-39" in browser.eval("document.getElementById('search-results').textContent")
    token = browser.eval("Object.keys(window.NWH_SEARCH.tokens['dense'])"
                         ".filter(t => t.trim())[0]")
    browser.eval("(() => { const i = document.getElementById('search-token'); "
                 f"i.value = {json.dumps(token)}; i.dispatchEvent(new Event('input')); }})()")
    hits = browser.eval("document.querySelectorAll('#search-results li.hit').length")
    want = browser.eval(f"window.NWH_SEARCH.tokens['dense'][{json.dumps(token)}].length")
    assert hits >= want > 0


def test_graph_draws_the_active_neurons(site, browser):
    assert browser.open(site / "graphs" / "dense.html") == []
    drawn = browser.eval("document.querySelectorAll('#graph circle').length")
    want = browser.eval("JSON.parse(document.getElementById('graph-data').textContent)"
                        ".graphs[0].layers.reduce((n, l) => n + l.nodes.length, 0)")
    assert drawn == want > 0
    edges = browser.eval("document.querySelectorAll('#graph line.edge').length")
    assert edges == browser.eval("JSON.parse(document.getElementById('graph-data').textContent)"
                                 ".graphs[0].edges.length")
    browser.eval("(() => { const s = document.getElementById('graph-row'); s.value = '1'; "
                 "s.dispatchEvent(new Event('change')); })()")
    assert "row" in browser.eval("document.getElementById('graph-edges').textContent")


def test_the_checks_see_errors_and_missing_files(tmp_path, browser):
    """What the page checks rely on: a thrown error and a file that fails to load are reported."""
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><img src="missing.png"><script>throw new Error("boom")'
                    "</script>")
    errors = browser.open(page)
    assert any("boom" in e for e in errors), errors
    assert any("missing.png" in e for e in errors), errors
    assert browser.eval("document.images[0].naturalWidth") == 0
