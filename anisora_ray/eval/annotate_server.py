"""The annotation page: blind side-by-side comparisons served from one process (stdlib HTTP server).

Bound to loopback unless told otherwise; the page is inline HTML/CSS/JS (no CDN), the videos are
read from the study's own files. The page never learns which version is on which side: it gets a
comparison id, the prompt, and ``/video/<id>/left|right``. Keys: ← or 1 = left, → or 2 = right,
↓, space or 0 = tie.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from anisora_ray.eval.annotate import AnnotationStore, clean_name
from anisora_ray.io import fs

log = logging.getLogger(__name__)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>anisora-ray: which video is better?</title>
<style>body{font:15px/1.45 system-ui,sans-serif;margin:20px auto;max-width:1100px;color:#222}
.sides{display:flex;gap:18px}.side{flex:1;text-align:center}video{width:100%;max-height:60vh;background:#000}
button{font-size:16px;padding:8px 18px;margin:6px}#prompt{font-size:17px;margin:10px 0}.muted{color:#777}
#progressbar{height:6px;background:#eee}#progressbar div{height:6px;background:#3a7}</style></head><body>
<div id="login"><h2>Blind video comparison</h2><p>Your name (recorded with your answers):</p>
<input id="name" autocomplete="off"> <button id="start">Start</button></div>
<div id="task" hidden><div id="progressbar"><div id="bar" style="width:0"></div></div>
<p class="muted"><span id="who"></span> · <span id="progress"></span> · keys: ← left, → right, ↓ or space tie</p>
<div id="prompt"></div><div class="sides">
<div class="side"><video id="left" autoplay loop muted playsinline></video><br><button id="choose-left">Left is better (←)</button></div>
<div class="side"><video id="right" autoplay loop muted playsinline></video><br><button id="choose-right">Right is better (→)</button></div>
</div><p style="text-align:center"><button id="choose-tie">About the same (↓)</button></p></div>
<div id="done" hidden><h2>Thank you: every comparison is answered.</h2><p id="done-progress"></p></div>
<script>
let name = "", current = null, busy = false;
const $ = (id) => document.getElementById(id);
async function next() {
  const r = await fetch("/api/next?annotator=" + encodeURIComponent(name));
  const d = await r.json();
  $("progress").textContent = d.done + " / " + d.total + " answered";
  $("bar").style.width = (d.total ? 100 * d.done / d.total : 100) + "%";
  if (!d.comparison) { $("task").hidden = true; $("done").hidden = false;
    $("done-progress").textContent = d.done + " / " + d.total + " answered"; current = null; return; }
  current = d.comparison.id;
  $("prompt").textContent = d.comparison.prompt;
  $("left").src = "/video/" + current + "/left"; $("right").src = "/video/" + current + "/right";
  busy = false;
}
async function answer(choice) {
  if (current === null || busy) return;
  busy = true;
  const r = await fetch("/api/answer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({annotator: name, comparison: current, choice: choice})});
  if (!r.ok) { alert(await r.text()); busy = false; return; }
  await next();
}
$("start").onclick = () => { name = $("name").value.trim(); if (!name) return;
  $("login").hidden = true; $("task").hidden = false; $("who").textContent = name; next(); };
$("name").addEventListener("keydown", (e) => { if (e.key === "Enter") $("start").click(); });
$("choose-left").onclick = () => answer("left"); $("choose-right").onclick = () => answer("right");
$("choose-tie").onclick = () => answer("tie");
document.addEventListener("keydown", (e) => {
  if ($("task").hidden) return;
  if (e.key === "ArrowLeft" || e.key === "1") answer("left");
  else if (e.key === "ArrowRight" || e.key === "2") answer("right");
  else if (e.key === "ArrowDown" || e.key === " " || e.key === "0") { e.preventDefault(); answer("tie"); }
});
</script></body></html>"""


MAX_BODY = 64 * 1024  # an answer is a few dozen bytes
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host headers a page at ``host:port`` is asked under; None (any) when bound to every address, which opens
    the page to the network on purpose. A name that another site's DNS points at 127.0.0.1 (DNS rebinding) is not one
    of them, so that site's scripts cannot read the study or vote through the annotator's browser."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = set(LOOPBACK) if host in LOOPBACK else {host.lower()}  # a browser sends the name in lower case
    hosts = {f"[{n}]" if ":" in n else n for n in names}
    return {f"{h}:{port}" for h in hosts} | (hosts if port == 80 else set())  # and leaves out port 80


def make_handler(store: AnnotationStore, hosts: set[str] | None = None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "anisora-annotate"

        def _host_refused(self) -> bool:
            if hosts is None or self.headers.get("Host", "").lower() in hosts:
                return False
            self._error(HTTPStatus.MISDIRECTED_REQUEST, f"this page answers to {sorted(hosts)[0]}")
            return True

        def log_message(self, fmt, *args):  # quiet: one debug line per request
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, payload, status: int = 200) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, status: int, text: str) -> None:
            self._send(status, text.encode(), "text/plain; charset=utf-8")

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self._host_refused():
                return None
            url = urlparse(self.path)
            if url.path == "/":
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if url.path == "/api/next":
                try:
                    annotator = clean_name(parse_qs(url.query).get("annotator", [""])[0])
                except ValueError as exc:
                    return self._error(HTTPStatus.BAD_REQUEST, str(exc))
                comparison, done, total = store.next_for(annotator)
                shown = None if comparison is None else {"id": comparison["id"], "prompt": comparison["prompt"]}
                return self._json({"comparison": shown, "done": done, "total": total})
            parts = url.path.strip("/").split("/")
            if len(parts) == 3 and parts[0] == "video" and parts[1].isdigit() and parts[2] in ("left", "right"):
                comparison = store.comparison(int(parts[1]))
                if comparison is None:
                    return self._error(HTTPStatus.NOT_FOUND, "no such comparison")
                try:
                    video = fs.read_bytes(comparison[f"{parts[2]}_uri"])
                except OSError as exc:  # moved or deleted since the study was built: said, not a silent blank side
                    log.warning("video of comparison %s (%s) not readable: %s", parts[1], parts[2], exc)
                    return self._error(HTTPStatus.NOT_FOUND, f"video of comparison {parts[1]} not readable (the "
                                       "server's log names the file)")  # its path would tell which version it is
                return self._send(200, video, "video/mp4")
            return self._error(HTTPStatus.NOT_FOUND, "not found")

        def do_POST(self):  # noqa: N802
            if self._host_refused():
                return None
            if urlparse(self.path).path != "/api/answer":
                return self._error(HTTPStatus.NOT_FOUND, "not found")
            # only this page's own requests: another site's page can post a form or text/plain without asking (a
            # "simple" request), but not JSON, and a browser names the page's origin
            kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
            origin = self.headers.get("Origin")
            if kind != "application/json":
                return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "answers are JSON (Content-Type: application/json)")
            if origin is not None and urlparse(origin).netloc != self.headers.get("Host", ""):
                return self._error(HTTPStatus.FORBIDDEN, f"answers come from this page, not from {origin}")
            try:
                size = int(self.headers.get("Content-Length", -1))
            except ValueError:
                size = -1
            if not 0 <= size <= MAX_BODY:
                self.close_connection = True  # the body, if any, is not read
                return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE if size > MAX_BODY else HTTPStatus.LENGTH_REQUIRED,
                                   f"an answer is a JSON object of at most {MAX_BODY} bytes with its Content-Length")
            try:
                body = json.loads(self.rfile.read(size) or b"{}")
                if not isinstance(body, dict):
                    raise TypeError(f"expected a JSON object, got {type(body).__name__}")
                store.answer(str(body.get("annotator", "")), int(body["comparison"]), str(body.get("choice")))
            except (ValueError, KeyError, TypeError) as exc:
                return self._error(HTTPStatus.BAD_REQUEST, f"answer not stored: {exc}")
            return self._json({"stored": True})

    return Handler


def serve(store: AnnotationStore, host: str = "127.0.0.1", port: int = 8765, background: bool = False):
    """Serve the page; with ``background`` return the running server (``server.shutdown()`` stops it)."""
    server = ThreadingHTTPServer((host, port), make_handler(store))
    server.RequestHandlerClass = make_handler(store, allowed_hosts(host, server.server_address[1]))  # port 0: the bound one
    if background:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
    print(f"annotation page: http://{host}:{server.server_address[1]}/  ({len(store.comparisons())} comparisons; "
          f"answers in {store.path}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return server
