"""`difflabel serve`: a read-only status page over the job store (standard library HTTP server).

One HTML page (``orchestrator/static/serve.html``: inline CSS, JavaScript and SVG charts, no
outside assets) polls three JSON endpoints:

    GET /api/jobs                             the most recent jobs, with progress
    GET /api/jobs/<job>                       one job: summary, throughput over time, confidence
                                              histogram, model/reviewer confusion, least confident
    GET /api/jobs/<job>/items/<item>/thumb    a small JPEG of one item's image

Read-only: every transaction is ``READ ONLY`` on Postgres and only SELECTs are issued. A
thumbnail is served only for an item of the job in its path (the image is found from the
store, never from the request). The database URL is shown with its password masked; no S3
credential or token is read by anything here (boto3 finds them as it always does).

Queries are cached: a finished job's figures until it changes (a retry or resume runs it
again), a running job's progress for 10 times as long as it took to read and its charts for
30 times (at least MIN_REFRESH_S), so a page polling a 1,000,000-item job every few seconds
keeps the database busy for a bounded share of the time (about a quarter of one connection
at most), however many browsers have it open.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from orchestrator import dashboard, db, jobs
from orchestrator.schema import Job, JobStatus
from orchestrator.settings import Settings
from orchestrator.thumbnails import Thumbnails
from worker.errors import PermanentError, RetryableError, UsageError

#: Port `difflabel serve` listens on unless told otherwise.
DEFAULT_PORT = 8765
DEFAULT_HOST = "127.0.0.1"
#: Seconds between the page's polls while a job runs (and when none does: new jobs show up).
POLL_RUNNING_S = 3
POLL_IDLE_S = 15
#: A running job's figures are recomputed at most this often, and at most every REFRESH_FACTOR
#: times the time their query took (progress) or CHART_REFRESH_FACTOR times (the charts, the
#: confusion, the least confident items): a 0.5 s histogram on a 1,000,000-item job every 15 s.
MIN_REFRESH_S = 2.0
REFRESH_FACTOR = 10.0
CHART_REFRESH_FACTOR = 30.0
#: Jobs in the list.
JOB_LIST = 50
#: Query-string keys whose values are never shown (a libpq URL may carry ?password=...).
_SECRET_KEY = re.compile(r"pass|secret|token|key|credential", re.I)
_ROUTES = [
    (re.compile(r"^/$|^/index\.html$"), "page"),
    (re.compile(r"^/api/jobs$"), "job_list"),
    (re.compile(r"^/api/jobs/(\d{1,18})$"), "job_detail"),
    (re.compile(r"^/api/jobs/(\d{1,18})/items/(\d{1,18})/thumb$"), "thumb"),
    (re.compile(r"^/healthz$"), "health"),
    (re.compile(r"^/favicon\.(svg|ico)$"), "icon"),
]
_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def masked_url(url: str | None) -> str:
    """``url`` with any password replaced by *** (in the user part and in the query)."""
    if not url:
        return ""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = parts.query
    if query:
        query = urlencode([(k, "***" if _SECRET_KEY.search(k) else v)
                           for k, v in parse_qsl(query, keep_blank_values=True)], safe="*/:")
    out = url  # edited in place: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path
    if netloc != parts.netloc:
        out = out.replace("//" + parts.netloc, "//" + netloc, 1)
    if query != parts.query:
        out = out.replace("?" + parts.query, "?" + query, 1)
    return out


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is this machine's loopback."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


class _Cache:
    """Values by key, each valid while its version matches and it has not expired."""

    def __init__(self) -> None:
        self._d: dict[Any, tuple[float, Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, version: Any, factor: float | None, compute: Callable[[], Any]) -> Any:
        """The value under ``key`` if its version is ``version`` and it is fresh, else
        ``compute()``'s, kept for ``factor`` times as long as it took (None: until the
        version changes)."""
        now = time.monotonic()
        with self._lock:
            hit = self._d.get(key)
        if hit is not None and hit[1] == version and hit[0] > now:
            return hit[2]
        t0 = time.monotonic()
        value = compute()
        took = time.monotonic() - t0
        expires = float("inf") if factor is None else time.monotonic() + max(MIN_REFRESH_S, factor * took)
        with self._lock:
            self._d[key] = (expires, version, value)
            if len(self._d) > 10_000:  # keys are (job, part): only a long-lived server gets here
                self._d.clear()
        return value


class Dashboard:
    """The page's data: reads the store through read-only sessions, caches what it computed."""

    def __init__(self, settings: Settings, default_job: int | None = None):
        self.settings = settings
        self.Session = db.sessions(settings.database_url)
        self.default_job = default_job
        self.thumbs = Thumbnails(settings.s3_endpoint_url, max_pixels=settings.max_image_pixels)
        self.cache = _Cache()

    @staticmethod
    def _version(job: Job) -> tuple:
        return (job.status, job.finished_at, job.n_items)

    def job_list(self) -> dict[str, Any]:
        with dashboard.read_only(self.Session) as s:
            rows = dashboard.job_rows(s, JOB_LIST)
            out = [self.cache.get(("brief", j.id), self._version(j),
                                  REFRESH_FACTOR if j.status == JobStatus.RUNNING.value else None,
                                  lambda j=j: dashboard.job_brief(s, j)) for j in rows]
        default = self.default_job if self.default_job is not None else (out[0]["job"] if out else None)
        return {"jobs": out, "default_job": default, "store": masked_url(self.settings.database_url),
                "poll_s": POLL_RUNNING_S if any(j["status"] == JobStatus.RUNNING.value for j in out) else POLL_IDLE_S,
                "generated_at": dashboard.iso(datetime.now(timezone.utc))}

    def job_detail(self, job_id: int) -> dict[str, Any]:
        with dashboard.read_only(self.Session) as s:
            job = jobs.get_job(s, job_id)
            v, running = self._version(job), job.status == JobStatus.RUNNING.value
            chart = CHART_REFRESH_FACTOR if running else None

            def get(part: str, factor: float | None, f: Callable[[], Any]) -> Any:
                return self.cache.get((part, job_id), v, factor, f)

            summary = get("summary", REFRESH_FACTOR if running else None, lambda: dashboard.summary(s, job))
            out = {
                "summary": summary,
                "throughput": get("throughput", chart, lambda: dashboard.throughput_series(s, job)),
                "histogram": get("histogram", chart, lambda: dashboard.confidence_histogram(s, job_id)),
                # a finished job's least confident items are read once; their reviews, every time
                "least_confident": dashboard.with_reviews(
                    s, get("least", chart, lambda: dashboard.least_confident(s, job_id))),
                # reviews arrive whatever the job's state: on a timer even when it is finished
                "confusion": get("confusion", CHART_REFRESH_FACTOR,
                                 lambda: dashboard.confusion(s, job_id, summary["labels"])),
            }
        out["poll_s"] = POLL_RUNNING_S if running else POLL_IDLE_S
        out["generated_at"] = dashboard.iso(datetime.now(timezone.utc))
        return out

    def thumbnail(self, job_id: int, item_id: int) -> bytes | None:
        def uri() -> str | None:
            with dashboard.read_only(self.Session) as s:
                return dashboard.item_uri(s, job_id, item_id)

        return self.thumbs.get((job_id, item_id), uri)


#: Three bars of a histogram, the page's icon.
_ICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
         b'fill="#1d2330"/><rect x="3" y="8" width="2.5" height="5" fill="#d9534f"/><rect x="6.75" y="5" '
         b'width="2.5" height="8" fill="#e0b040"/><rect x="10.5" y="3" width="2.5" height="10" fill="#2f9e6b"/></svg>')


def _page() -> bytes:
    return resources.files("orchestrator").joinpath("static/serve.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    server_version = "difflabel"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    server: "Server"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._respond(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head=True)

    def _read_only(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"read-only: only GET and HEAD\n", {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_PATCH = do_DELETE = _read_only  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # one line per request would bury the URL printed at start; errors are logged below

    def _send(self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", _CSP)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, code: int, value: Any, head: bool = False) -> None:
        body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        self._send(code, "application/json", body, {"Cache-Control": "no-store"}, head)

    def _host_ok(self) -> bool:
        """Behind a loopback bind, only requests addressed to a loopback name are answered: a
        web page elsewhere cannot read this one through a DNS name it rebinds to 127.0.0.1."""
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        host = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")

    def _respond(self, head: bool) -> None:
        if not self._host_ok():
            self._send(421, "text/plain; charset=utf-8", b"unexpected Host header\n", head=head)
            return
        path = urlsplit(self.path).path
        for pattern, name in _ROUTES:
            m = pattern.match(path)
            if m:
                break
        else:
            self._json(404, {"error": f"no such page: {path[:100]}"}, head)
            return
        d: Dashboard = self.server.dashboard
        try:
            if name == "page":
                self._send(200, "text/html; charset=utf-8", _page(), {"Cache-Control": "no-cache"}, head)
            elif name == "icon":
                self._send(200, "image/svg+xml", _ICON, {"Cache-Control": "max-age=86400"}, head)
            elif name == "health":
                self._json(200, {"ok": True}, head)
            elif name == "job_list":
                self._json(200, d.job_list(), head)
            elif name == "job_detail":
                self._json(200, d.job_detail(int(m.group(1))), head)
            else:
                thumb = d.thumbnail(int(m.group(1)), int(m.group(2)))
                if thumb is None:
                    self._json(404, {"error": f"job {m.group(1)} has no item {m.group(2)}"}, head)
                else:
                    self._send(200, "image/jpeg", thumb, {"Cache-Control": "private, max-age=86400"}, head)
        except UsageError as e:  # no such job
            self._json(404, {"error": str(e)}, head)
        except PermanentError as e:  # an image that cannot be read or decoded
            self._json(404, {"error": str(e)}, head)
        except RetryableError as e:  # S3 unreachable
            self._json(503, {"error": str(e)}, head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as e:  # noqa: BLE001 - the page shows a line; the server keeps serving
            from sqlalchemy.exc import OperationalError

            if isinstance(e, OperationalError):
                reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
                self._json(503, {"error": f"database unavailable: {reason}"}, head)
                return
            self.log_error("%s on %s: %s", type(e).__name__, path, str(e).splitlines()[0] if str(e) else "")
            self._json(500, {"error": f"internal error ({type(e).__name__}); see the server's output"}, head)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], dashboard_: Dashboard, loopback_only: bool):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.dashboard = dashboard_
        self.loopback_only = loopback_only
        super().__init__(addr, Handler)


def make_server(settings: Settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                default_job: int | None = None) -> Server:
    """A bound, not yet serving, server; UsageError when the address cannot be used."""
    import errno

    try:
        return Server((host, port), Dashboard(settings, default_job), loopback_only=is_loopback(host))
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host} ({e.strerror}): pass an address of this machine, "
                         "e.g. --host 127.0.0.1") from e
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use: pass another --port "
                             "(--port 0 picks a free one)") from e
        if e.errno == errno.EACCES:
            raise UsageError(f"not allowed to listen on port {port}: pass a port above 1023, e.g. "
                             f"--port {DEFAULT_PORT}") from e
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"{host} is not an address of this machine: pass --host 127.0.0.1 or one "
                             "of its own addresses") from e
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


def url_of(server: Server, host: str) -> str:
    port = server.server_address[1]
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve_forever(server: Server) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket."""
    import signal

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
