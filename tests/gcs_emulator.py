"""A local Google Cloud Storage for the tests, reachable by every GCS client this project uses.

`running(directory)` starts this file as a server process and, while the block runs, points this process (and the
subprocesses it starts, which inherit the environment) at it; it yields an `Emulator`: `bucket` (gs://fcnet-test),
`env` (the variables it set), `requests()` (what the clients sent). The server process holds:

* `gcp-storage-emulator` (GCS's JSON API in memory) on 127.0.0.1, patched where it differs from GCS in ways the
  clients rely on (see "Emulator fixes" below). google-cloud-storage (Orbax asks it whether a bucket has a
  hierarchical namespace before listing steps) and gcsfs (etils.epath with `EPATH_USE_TF=false`) reach it through
  `STORAGE_EMULATOR_HOST`, tensorstore (Orbax's array data) through `TENSORSTORE_GCS_HTTP_URL`.
* A TLS-terminating HTTP CONNECT proxy for TensorFlow's GCS client (tf.io.gfile: TFRecords, TensorBoard events, and
  etils.epath, which uses tf.io.gfile when TensorFlow is installed). That client has no endpoint setting: it always
  calls https://www.googleapis.com/storage/v1/… (metadata, listing, copies), https://www.googleapis.com/upload/…
  (uploads) and https://storage.googleapis.com/<bucket>/<object> (ranged reads). Its libcurl honours
  `HTTPS_PROXY` and TensorFlow passes `CURL_CA_BUNDLE` on to it, so with both set the proxy answers the CONNECTs
  to those hosts with a certificate of a throw-away CA (generated into `directory` at start, valid for a day),
  decrypts the requests and forwards them to the emulator, rewriting the resumable-upload session URL the emulator
  returns (http://… → https://…, so that the upload goes through the proxy again). Any other host is refused.
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` makes both TensorFlow and tensorstore skip credentials.

Emulator fixes (gcp-storage-emulator 2026.7.19), applied in the server process:

* Preconditions: the emulator ignores `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch` and
  `ifMetagenerationNotMatch`; here they answer 412 (or 304 for a read whose `ifGenerationNotMatch` /
  `ifMetagenerationNotMatch` fails) as GCS does. tensorstore's OCDBT writes its manifest with `ifGenerationMatch`
  and revalidates cached reads with `ifGenerationNotMatch=<generation it holds>`.
* Media downloads carry no `x-goog-generation` header; GCS always sends it (and `x-goog-metageneration`,
  `x-goog-stored-content-length`). tensorstore takes a read's generation from that header. This was the
  "Malformed StorageGeneration" of a whole FCNet train state: with ~700 arrays, OCDBT's cache re-reads
  manifest.ocdbt with `ifGenerationNotMatch` (small trees never re-read it); the emulator answered 200 without
  the header (instead of 304) and the missing generation failed to parse. Not a bug of ours, nor of real GCS.
* `GET /storage/v1/b/<bucket>/storageLayout` (TensorFlow asks before renaming a directory whether the bucket has a
  hierarchical namespace) is missing (404, and the rename fails); here: a flat bucket, as GCS answers for one.
* A ranged read that starts at or past the end of a non-empty object answers 416 (GCS), not 206 with no bytes.

Run as a script (what `running` does): python tests/gcs_emulator.py --bucket=B --cert_dir=D; it prints one JSON
line {"emulator": url, "proxy": url} once both listen, then serves until SIGTERM.
"""

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import http.server
import json
import os
import re
import signal
import socketserver
import ssl
import subprocess
import sys
import threading
from typing import Dict, Iterator, List, Optional

BUCKET = "fcnet-test"
GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
PRECONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
START_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Emulator:
  bucket: str  # gs://BUCKET
  env: Dict[str, str]  # The variables that point the clients at it.
  log_path: str  # The server's log: one line per request the proxy forwarded ("proxy METHOD host path -> status").

  def requests(self) -> List[str]:
    with open(self.log_path) as f:
      return [line.split(" ", 1)[1].strip() for line in f if line.startswith("proxy ")]

  def reached(self, pattern: str) -> List[str]:
    """The proxied requests (TensorFlow's GCS client) matching `pattern`; fails if there are none."""
    found = [r for r in self.requests() if re.search(pattern, r)]
    assert found, f"no request matching {pattern!r} reached the emulator: {self.requests()[-20:]}"
    return found


def client_env(emulator_url: str, proxy_url: str, ca_path: str) -> Dict[str, str]:
  """The variables that send every client to the emulator: google-cloud-storage, gcsfs and tensorstore directly,
  TensorFlow's GCS client through the proxy (which it trusts through `ca_path`)."""
  return {
    "STORAGE_EMULATOR_HOST": emulator_url,
    "TENSORSTORE_GCS_HTTP_URL": emulator_url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "HTTPS_PROXY": proxy_url,
    "https_proxy": proxy_url,
    "CURL_CA_BUNDLE": ca_path,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
  }


def _forget_epath_backend_choice():
  """epath decides once per process (functools.cache) whether TensorFlow's gfile serves gs://; forget it, so that
  a change of EPATH_USE_TF takes effect."""
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access


@contextlib.contextmanager
def running(directory: str, extra_env: Optional[Dict[str, str]] = None) -> Iterator[Emulator]:
  """Starts the server process (its certificates and log in `directory`), sets `client_env` (and `extra_env`) in
  os.environ while the block runs, then restores the environment and stops the server."""
  os.makedirs(directory, exist_ok=True)
  log_path = os.path.join(directory, "server.log")
  with open(log_path, "w") as log:
    server = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), f"--bucket={BUCKET}", f"--cert_dir={directory}"],
      stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
  saved = dict(os.environ)
  try:
    ready = threading.Timer(START_TIMEOUT_S, server.kill)  # A server that never reports kills readline's wait.
    ready.start()
    line = server.stdout.readline()
    ready.cancel()
    if not line:
      with open(log_path) as f:
        raise RuntimeError(f"the GCS emulator did not start (exit {server.wait()}):\n{f.read()[-4000:]}")
    urls = json.loads(line)
    env = {**client_env(urls["emulator"], urls["proxy"], os.path.join(directory, "ca.pem")), **(extra_env or {})}
    os.environ.update(env)
    _forget_epath_backend_choice()
    yield Emulator(f"gs://{BUCKET}", env, log_path)
  finally:
    os.environ.clear()
    os.environ.update(saved)
    _forget_epath_backend_choice()
    server.terminate()
    server.wait(timeout=30)
    server.stdout.close()


# The server process.


def make_certificates(directory: str):
  """A throw-away CA (ca.pem) and a certificate for GCS_HOSTS signed by it (server.pem, server.key)."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)

  def certificate(subject, issuer, public_key, signing_key, *, ca: bool):
    builder = (
      x509.CertificateBuilder()
      .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
      .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
      .public_key(public_key)
      .serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(hours=1))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
      builder = builder.add_extension(
        x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
      ).add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    else:
      builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName(host) for host in GCS_HOSTS]), critical=False
      ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())

  ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = certificate("fcnet-test CA", "fcnet-test CA", ca_key.public_key(), ca_key, ca=True)
  server = certificate(GCS_HOSTS[0], "fcnet-test CA", server_key.public_key(), ca_key, ca=False)
  paths = {name: os.path.join(directory, name) for name in ("ca.pem", "server.pem", "server.key")}
  with open(paths["ca.pem"], "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(paths["server.pem"], "wb") as f:
    f.write(server.public_bytes(serialization.Encoding.PEM))
  with open(paths["server.key"], "wb") as f:
    f.write(
      server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
      )
    )
  return paths


def _object_of(request) -> Optional[tuple]:
  """(bucket, object) that an emulator request reads or writes, or None."""
  params = request.params or {}
  if "object_id" in params:
    return params["bucket_name"], params["object_id"]
  if "bucket_name" in params and request.query.get("name"):
    return params["bucket_name"], request.query["name"][0]
  return None


def patch_emulator():
  """The fixes of the module docstring, on gcp-storage-emulator's handler table."""
  from gcp_storage_emulator import exceptions  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def failed_precondition(request, storage) -> Optional[int]:
    """412 / 304 when a precondition of `request` does not hold, else None."""
    conditions = {name: request.query[name][0] for name in PRECONDITIONS if name in request.query}
    target = _object_of(request)
    if not conditions or target is None:
      return None
    try:
      obj = storage.get_file_obj(*target)
      generation, metageneration = str(obj["generation"]), str(obj["metageneration"])
    except exceptions.NotFound:
      generation, metageneration = "0", None
    reading = request.method == "GET"
    for name, value in conditions.items():
      actual = metageneration if "Metageneration" in name else generation
      if "NotMatch" in name and actual == value:
        return 304 if reading else 412
      if "NotMatch" not in name and actual != value:
        return 412
    return None

  def media_headers(request, response, storage):
    target = _object_of(request)
    if response.status in (200, 206) and target is not None:
      obj = storage.get_file_obj(*target)
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
      response["x-goog-stored-content-length"] = str(obj["size"])

  def range_past_end(request, storage) -> bool:
    match = re.fullmatch(r"\s*bytes=(\d+)-\d*", request.get_header("range") or "")
    target = _object_of(request)
    if not match or target is None:
      return False
    try:
      size = int(storage.get_file_obj(*target)["size"])
    except exceptions.NotFound:
      return False
    return 0 < size <= int(match.group(1))

  def checked(handler, media: bool):
    def wrapper(request, response, storage, *args, **kwargs):
      status = failed_precondition(request, storage)
      if status is not None:
        response.status = http.HTTPStatus(status)
        return None
      if request.data is None and handler is objects.insert:
        request._data = b""  # pylint: disable=protected-access  # An empty media upload (a directory marker).
      is_media = media or (request.query.get("alt") or [""])[0] == "media"
      if is_media and range_past_end(request, storage):
        response.status = http.HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
        return None
      result = handler(request, response, storage, *args, **kwargs)
      if is_media:
        media_headers(request, response, storage)
      return result

    return wrapper

  wrapped = {
    objects.get: checked(objects.get, media=False),
    objects.download: checked(objects.download, media=True),
    objects.insert: checked(objects.insert, media=False),
    objects.upload_partial: checked(objects.upload_partial, media=False),
    objects.delete: checked(objects.delete, media=False),
  }

  def storage_layout(request, response, storage):
    del storage
    bucket = request.params["bucket_name"]
    response.json({"kind": "storage#storageLayout", "bucket": bucket, "hierarchicalNamespace": {"enabled": False}})

  server.HANDLERS = ((r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$", {"GET": storage_layout}),) + tuple(
    (regex, {method: wrapped.get(handler, handler) for method, handler in handlers.items()})
    for regex, handlers in server.HANDLERS
  )


class _Forwarder(http.server.BaseHTTPRequestHandler):
  """The decrypted HTTP/1.1 requests of one CONNECT tunnel, forwarded to the emulator."""

  protocol_version = "HTTP/1.1"

  def __init__(self, sock, host: str, proxy: "_Proxy"):
    self.host_name = host
    self.proxy = proxy
    super().__init__(sock, ("tunnel", 0), proxy)

  def _forward(self):
    if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
      body = self._read_chunked()
    else:
      length = int(self.headers.get("Content-Length") or 0)
      body = self.rfile.read(length) if length else None
    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "proxy-connection")}
    if body is not None:
      headers["Content-Length"] = str(len(body))
    headers["Host"] = self.host_name  # The emulator builds its session URLs from Host.
    connection = http.client.HTTPConnection(*self.proxy.emulator, timeout=120)
    try:
      connection.request(self.command, self.path, body=body, headers=headers)
      response = connection.getresponse()
      content = response.read()
      response_headers = response.getheaders()
      status, reason = response.status, response.reason
    finally:
      connection.close()
    self.proxy.log(f"proxy {self.command} {self.host_name} {self.path} -> {status}")
    self.send_response(status, reason)
    for name, value in response_headers:
      if name.lower() in ("content-length", "connection", "transfer-encoding", "server", "date"):
        continue
      if name.lower() == "location":
        value = re.sub(r"^http://", "https://", value)
      self.send_header(name, value)
    self.send_header("Content-Length", str(len(content)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(content)

  def _read_chunked(self) -> bytes:
    data = b""
    while True:
      size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
      if not size:
        self.rfile.readline()
        return data
      data += self.rfile.read(size)
      self.rfile.readline()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args


class _ConnectHandler(socketserver.StreamRequestHandler):
  def handle(self):
    request_line = self.rfile.readline().decode("latin-1").split()
    while self.rfile.readline().strip():  # The CONNECT request's headers.
      pass
    if len(request_line) != 3 or request_line[0] != "CONNECT" or request_line[1].rsplit(":", 1)[0] not in GCS_HOSTS:
      self.server.log(f"refused {' '.join(request_line)}")
      self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
      return
    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    self.wfile.flush()
    try:
      with self.server.tls.wrap_socket(self.connection, server_side=True) as tunnel:
        _Forwarder(tunnel, request_line[1].rsplit(":", 1)[0], self.server)
    except (ssl.SSLError, ConnectionError) as e:
      self.server.log(f"tunnel closed: {e!r}")


class _Proxy(socketserver.ThreadingTCPServer):
  daemon_threads = True

  def __init__(self, emulator, certificates):
    super().__init__(("127.0.0.1", 0), _ConnectHandler)
    self.emulator = emulator
    self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self.tls.load_cert_chain(certificates["server.pem"], certificates["server.key"])
    self._lock = threading.Lock()

  def log(self, line: str):
    with self._lock:
      print(line, file=sys.stderr, flush=True)


def serve(bucket: str, cert_dir: str):
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top

  patch_emulator()
  certificates = make_certificates(cert_dir)
  emulator = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
  emulator.start()
  address = emulator._api._httpd.server_address  # pylint: disable=protected-access
  proxy = _Proxy(address, certificates)
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  urls = {"emulator": f"http://{address[0]}:{address[1]}", "proxy": f"http://127.0.0.1:{proxy.server_address[1]}"}
  print(json.dumps(urls), flush=True)
  while not stop.wait(1):
    pass
  proxy.shutdown()
  emulator.stop()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--bucket", default=BUCKET)
  parser.add_argument("--cert_dir", required=True)
  args = parser.parse_args()
  serve(args.bucket, args.cert_dir)
