"""A local Google Cloud Storage server for tests of gs:// workdirs.

`gcs_bucket` (a module-scoped pytest fixture) starts `gcp-storage-emulator` in a
subprocess on a free 127.0.0.1 port, creates an empty in-memory bucket, points the
clients at it and yields the bucket's name; at the end it stops the server and puts
the environment and the clients' caches back as they were. Skipped when
`gcp-storage-emulator` or `gcsfs` is not installed (requirements-gcs-test.txt).

Which clients reach it:
- tensorstore (orbax's arrays): `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` so it never looks for real credentials;
- etils.epath (orbax's metadata, this codebase's files) through fsspec/gcsfs:
  `EPATH_USE_TF=false` + `STORAGE_EMULATOR_HOST`, anonymous token, plain
  `gcsfs.core.GCSFileSystem` (gcsfs's default `ExtendedGcsFileSystem` asks the
  Storage Control gRPC API for the bucket type first; against the emulator that
  call fails after 60 s, for every operation);
- google-cloud-storage: `STORAGE_EMULATOR_HOST`.
Not TensorFlow's own GCS filesystem (tf.io.gfile, tf.summary, TFDS): it has no
endpoint override, so under this fixture it still means the real GCS. Tests must
not send it gs:// paths except in a network namespace without a way out.

Caches this handles (all filled by the first use in a process, whatever the env
says later): epath's `_is_tf_installed()` (EPATH_USE_TF is read once), epath's
fsspec filesystem, fsspec's instance cache of GCSFileSystem, fsspec's registry
entry for gs/gcs (gcsfs picks its class at import), fsspec's config (FSSPEC_*
variables are read at import). tensorstore reads TENSORSTORE_GCS_HTTP_URL at each
open (two emulators one after the other in one process work); its shared auth
provider keeps the testing token for the rest of the process (harmless: no test
reaches the real GCS).

The metadata-server variables are aimed at a closed local port, so that a client
which, despite the above, goes looking for GCE credentials fails at once instead
of sending traffic off this machine.

The server is the emulator's with three additions of real GCS behaviour that the
clients rely on (see `_patch_handlers`): generation preconditions, the
x-goog-generation header of downloads (both needed by tensorstore for checkpoints of
more than a few arrays) and objects.move (gcsfs's rename); and a second bucket,
`READ_ONLY_BUCKET`, that answers every write with 403.

Run as a script (`python tests/gcs_emulator.py BUCKET`) it is the server: prints
`PORT <n>` once listening and exits when its stdin closes (its parent is gone, or Ctrl-D
in a terminal, where it also prints the `export` lines of `client_env`).
"""

import contextlib
import functools
import importlib
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterator

import pytest

BUCKET = "beit-jax-test"
# A second bucket that exists and can be listed and read, but refuses every write (403),
# as a bucket does to an account with only the Storage Object Viewer role.
READ_ONLY_BUCKET = BUCKET + "-read-only"
PROJECT = "beit-jax-test-project"
_CLOSED_PORT = "127.0.0.1:9"  # discard: nothing listens, connections are refused
_START_TIMEOUT_SECS = 30.0


# --------------------------------------------------------------------------- server


def _patch_handlers() -> None:
  """What GCS does and the emulator (2026.7.19) lacks, that the clients here rely on.

  - Generation preconditions (`ifGenerationMatch` / `ifGenerationNotMatch` on object
    GET, upload and DELETE: 412, or 304 for a read) and the `x-goog-generation` header
    of a media download. tensorstore's gcs driver needs both for OCDBT (orbax's array
    format): without them a checkpoint of more than a handful of arrays fails with
    "Error writing .../manifest.ocdbt: Malformed StorageGeneration".
  - objects.move (`POST .../o/SRC/moveTo/o/DST`), gcsfs's rename: on the emulator's
    501 gcsfs retries with backoff (~30 s) before it copies and deletes.
  The server handles one request at a time, so check-then-write is atomic here.
  """
  from http import HTTPStatus  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import settings  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top

  def generation(storage, bucket, name):
    try:
      return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
      return None

  def failed_precondition(request, storage, name, read):
    """The status to answer instead of running the handler, or None."""
    q = request.query
    if not name or ("ifGenerationMatch" not in q and "ifGenerationNotMatch" not in q):
      return None
    current = generation(storage, request.params["bucket_name"], name)
    if "ifGenerationMatch" in q:
      want = int(q["ifGenerationMatch"][0])
      if (current is not None) if want == 0 else (current != want):
        return HTTPStatus.PRECONDITION_FAILED
    if (
      "ifGenerationNotMatch" in q
      and current is not None
      and current == int(q["ifGenerationNotMatch"][0])
    ):
      return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None

  def guarded(handler, read, name_of):
    def wrapped(request, response, storage, *args, **kwargs):
      status = failed_precondition(request, storage, name_of(request), read)
      if status is not None:
        response.status = status
        return None
      return handler(request, response, storage, *args, **kwargs)

    return wrapped

  original_download = objects.download

  def download(request, response, storage, *args, **kwargs):
    original_download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  def move(request, response, storage, *args, **kwargs):
    del args, kwargs
    p = request.params
    try:
      obj = objects._copy(
        request.base_url,
        storage,
        p["bucket_name"],
        p["object_id"],  # pylint: disable=protected-access
        p["bucket_name"],
        p["dest_object_id"],
      )
    except NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    objects._delete(storage, p["bucket_name"], p["object_id"])  # pylint: disable=protected-access
    response.json(obj)

  def read_only(handler):
    def wrapped(request, response, storage, *args, **kwargs):
      if READ_ONLY_BUCKET in (
        request.params.get("bucket_name"),
        request.params.get("dest_bucket_name"),
      ):
        message = (
          f"emulator@{PROJECT}.iam.gserviceaccount.com does not have "
          f"storage.objects.create access to the Google Cloud Storage bucket."
        )
        response.status = HTTPStatus.FORBIDDEN
        response.json(
          {
            "error": {
              "code": 403,
              "message": message,
              "errors": [{"message": message, "reason": "forbidden"}],
            }
          }
        )
        return None
      return handler(request, response, storage, *args, **kwargs)

    return wrapped

  object_id = lambda request: request.params.get("object_id")
  upload_name = lambda request: (request.query.get("name") or [None])[0]
  objects.download = download  # objects.get(alt=media) calls it by this name
  replace = {
    original_download: guarded(download, True, object_id),
    objects.get: guarded(objects.get, True, object_id),
    objects.delete: guarded(objects.delete, False, object_id),
    objects.insert: guarded(objects.insert, False, upload_name),
  }
  api = settings.API_ENDPOINT
  move_route = (
    rf"^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
    rf"(?P<dest_object_id>.*[^/]+)$",
    {"POST": move},
  )
  writes = lambda method, fn: fn if method == "GET" else read_only(fn)
  server.HANDLERS = ((move_route[0], {"POST": read_only(move)}),) + tuple(
    (regex, {method: writes(method, replace.get(fn, fn)) for method, fn in methods.items()})
    for regex, methods in server.HANDLERS
  )


def serve(bucket: str) -> None:
  """The server process: in-memory storage with one bucket, on a free port."""
  from http.server import HTTPServer  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import buckets  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.storage import Storage  # pylint: disable=g-import-not-at-top

  _patch_handlers()
  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  buckets.create_bucket(READ_ONLY_BUCKET, storage)
  # Port 0: the kernel picks a free port, so no race with other processes.
  httpd = HTTPServer(("127.0.0.1", 0), functools.partial(server.RequestHandler, storage))

  def exit_with_parent():
    sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, daemon=True).start()
  port = httpd.server_address[1]
  print(f"PORT {port}", flush=True)
  if sys.stdin.isatty():  # by hand: how to point a shell's clients at it
    env = client_env(f"http://127.0.0.1:{port}", tempfile.mkdtemp(prefix="gcs_emulator_"))
    lines = [f"export {k}={v}" if v is not None else f"unset {k}" for k, v in env.items()]
    print(
      f"Serving gs://{bucket} on 127.0.0.1:{port} until Ctrl-D. In the shell of a run:\n"
      + "\n".join(lines),
      file=sys.stderr,
      flush=True,
    )
  httpd.serve_forever()


# --------------------------------------------------------------------------- client side


class Emulator:
  """A running emulator: `url` (http://127.0.0.1:PORT), `bucket`, and its log."""

  def __init__(self, proc: subprocess.Popen, url: str, bucket: str, log_path: str):
    self.proc, self.url, self.bucket, self.log_path = proc, url, bucket, log_path

  def log(self) -> str:
    with open(self.log_path, encoding="utf-8", errors="replace") as f:
      return f.read()

  def stop(self) -> None:
    self.proc.stdin.close()  # the server exits at EOF
    try:
      self.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait(timeout=5)
    self.proc.stdout.close()


def start(bucket: str = BUCKET, log_dir: str | None = None) -> Emulator:
  """Starts the server process; returns once it listens."""
  log_path = os.path.join(log_dir or tempfile.mkdtemp(prefix="gcs_emulator_"), "emulator.log")
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), bucket],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=log,
      cwd=os.path.dirname(log_path),
    )
  deadline = time.monotonic() + _START_TIMEOUT_SECS
  line = b""
  while not line.endswith(b"\n"):
    left = deadline - time.monotonic()
    if left <= 0 or proc.poll() is not None or not select.select([proc.stdout], [], [], left)[0]:
      break
    chunk = os.read(proc.stdout.fileno(), 64)
    if not chunk:
      break
    line += chunk
  if not line.startswith(b"PORT "):
    proc.kill()
    proc.wait()
    with open(log_path, encoding="utf-8", errors="replace") as f:
      raise RuntimeError(f"GCS emulator did not start (got {line!r}): {f.read()[-2000:]}")
  port = int(line.split()[1])
  return Emulator(proc, f"http://127.0.0.1:{port}", bucket, log_path)


def client_env(url: str, cloudsdk_config: str) -> dict[str, str | None]:
  """The variables that send the clients to `url` (None: removed)."""
  return {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax arrays)
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore (and TF): no credential search
    "EPATH_USE_TF": "false",  # epath: fsspec/gcsfs, not tf.io.gfile
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs, when imported after this
    "FSSPEC_GCS_TOKEN": "anon",  # fsspec, when imported after this (subprocesses)
    "FSSPEC_GCS_PROJECT": PROJECT,
    "GOOGLE_CLOUD_PROJECT": PROJECT,
    "GCSFS_DEFAULT_PROJECT": PROJECT,
    "NO_GCE_CHECK": "true",  # gcsfs, google-auth: don't probe for GCE
    "GCE_METADATA_HOST": _CLOSED_PORT,  # google-auth (read at its import)
    "GCE_METADATA_IP": _CLOSED_PORT,  # google-auth
    "GCE_METADATA_ROOT": _CLOSED_PORT,  # tensorstore, older google-auth
    "CLOUDSDK_CONFIG": cloudsdk_config,  # an empty folder: no gcloud credentials
    "GOOGLE_APPLICATION_CREDENTIALS": None,
  }


@contextlib.contextmanager
def patched_env(values: dict[str, str | None]) -> Iterator[None]:
  saved = {k: os.environ.get(k) for k in values}
  try:
    for k, v in values.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def reset_client_caches() -> None:
  """Forgets what epath and fsspec decided from the environment they saw first."""
  from etils.epath import backend as epath_backend  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top

  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  if "gcsfs" in sys.modules:
    import gcsfs  # pylint: disable=g-import-not-at-top

    for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
      cls.clear_instance_cache()


@contextlib.contextmanager
def _gcsfs_for_emulator() -> Iterator[None]:
  """fsspec's gs/gcs -> plain GCSFileSystem, anonymous, with a project; then back."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs.core  # pylint: disable=g-import-not-at-top

  registry = importlib.import_module("fsspec.registry")
  names = ("gs", "gcs")
  saved_registry = {n: registry._registry.get(n) for n in names}  # pylint: disable=protected-access
  saved_conf = {n: fsspec.config.conf.get(n) for n in names}
  try:
    for n in names:
      fsspec.register_implementation(n, gcsfs.core.GCSFileSystem, clobber=True)
      fsspec.config.conf[n] = dict(saved_conf[n] or {}, token="anon", project=PROJECT)
    yield
  finally:
    for n in names:
      if saved_registry[n] is None:
        registry._registry.pop(n, None)  # pylint: disable=protected-access
      else:
        fsspec.register_implementation(n, saved_registry[n], clobber=True)
      if saved_conf[n] is None:
        fsspec.config.conf.pop(n, None)
      else:
        fsspec.config.conf[n] = saved_conf[n]


@contextlib.contextmanager
def running(bucket: str = BUCKET) -> Iterator[Emulator]:
  """An emulator with every client in this process pointed at it, for the `with` block."""
  pytest.importorskip(
    "gcp_storage_emulator",
    reason="needs gcp-storage-emulator (pip install -r requirements-gcs-test.txt)",
  )
  pytest.importorskip("gcsfs", reason="needs gcsfs (pip install -r requirements-gcs-test.txt)")
  with tempfile.TemporaryDirectory(prefix="gcs_emulator_") as tmp:
    cloudsdk = os.path.join(tmp, "gcloud")
    os.makedirs(cloudsdk)
    emulator = start(bucket, log_dir=tmp)
    try:
      with patched_env(client_env(emulator.url, cloudsdk)), _gcsfs_for_emulator():
        reset_client_caches()
        try:
          yield emulator
        finally:
          reset_client_caches()
    finally:
      emulator.stop()
  reset_client_caches()


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[Emulator]:
  with running() as emulator:
    yield emulator


@pytest.fixture(scope="module")
def gcs_bucket(gcs_emulator: Emulator) -> str:  # pylint: disable=redefined-outer-name
  """The name of an empty bucket on the local emulator (gs://<name>/...)."""
  return gcs_emulator.bucket


@pytest.fixture
def gcs_dir(gcs_bucket: str) -> str:  # pylint: disable=redefined-outer-name
  """A fresh gs:// folder (no trailing slash) for one test."""
  return f"gs://{gcs_bucket}/{uuid.uuid4().hex[:12]}"


if __name__ == "__main__":
  serve(sys.argv[1] if len(sys.argv) > 1 else BUCKET)
