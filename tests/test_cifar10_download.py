"""The CIFAR-10 download: a local HTTP server serves a tiny archive in the official format.

No internet: every URL here is on 127.0.0.1 (a server in a thread, a port that
refuses connections, or one that never answers).
"""

import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
import time
import types

import numpy as np
import pytest

from enas_jax import data
from enas_jax.data import cifar10


def _archive_bytes(seed=0, per_batch=4, n_test=3):
  """A tar.gz of cifar-10-batches-py/ laid out as the official python version."""
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  images = {}
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    def add(name, obj):
      blob = pickle.dumps(obj, protocol=2)
      info = tarfile.TarInfo(f"{cifar10.BATCHES_DIR}/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))

    for name, n in [(f, per_batch) for f in cifar10.TRAIN_FILES] + [(cifar10.TEST_FILE, n_test)]:
      rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)  # R, G, B planes per row
      labels = [int(v) for v in rng.integers(0, 10, n)]
      images[name] = rows.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
      add(name, {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                 b"filenames": [b"x.png"] * n})
    add("batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                         b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                                          b"dog", b"frog", b"horse", b"ship", b"truck"]})
  return buf.getvalue(), images


class _Handler(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # noqa: N802 (http.server's name)
    self.server.hits.append(self.path)
    route = self.server.routes.get(self.path)
    if route is None:
      self.send_error(404)
      return
    body, length = route
    self.send_response(200)
    self.send_header("Content-Type", "application/gzip")
    self.send_header("Content-Length", str(len(body) if length is None else length))
    self.end_headers()
    self.wfile.write(body)
    self.wfile.flush()
    self.close_connection = True  # a short body then ends with the connection

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  """routes: path -> (body, Content-Length or None for the true length); url(path)."""
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  srv.routes, srv.hits = {}, []
  srv.daemon_threads = True
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
  yield srv
  srv.shutdown()
  srv.server_close()


@pytest.fixture
def refused_url():
  """A URL on a port bound but not listening: connections are refused at once."""
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  yield f"http://127.0.0.1:{s.getsockname()[1]}/{cifar10.ARCHIVE}"
  s.close()


@pytest.fixture
def archive(monkeypatch):
  body, images = _archive_bytes()
  monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(body).hexdigest())
  return body, images


def _no_leftovers(d):
  """Nothing in d that looks complete, and no temporary files."""
  names = sorted(os.listdir(d)) if os.path.isdir(d) else []
  assert cifar10.ARCHIVE not in names and cifar10.BATCHES_DIR not in names, names
  assert not [n for n in names if n.endswith(".part")], names


def test_download_md5_ok_loads_and_keeps_only_final_files(tmp_path, server, archive, capsys,
                                                          monkeypatch):
  body, images = archive
  server.routes["/c.tgz"] = (body, None)
  monkeypatch.setattr(cifar10, "PROGRESS_EVERY_S", 0.0)  # a progress line per block
  d = tmp_path / "data"
  got = cifar10.load_cifar10(str(d), num_valid=4, download=True,
                             download_url=server.url("/c.tgz"))
  train = np.concatenate([images[f] for f in cifar10.TRAIN_FILES])
  np.testing.assert_array_equal(got.train_x, train[:16])
  np.testing.assert_array_equal(got.valid_x, train[16:])
  np.testing.assert_array_equal(got.test_x, images[cifar10.TEST_FILE])
  assert "extracted from" in got.source
  assert sorted(os.listdir(d)) == sorted([cifar10.ARCHIVE, cifar10.BATCHES_DIR])
  assert sorted(os.listdir(d / cifar10.BATCHES_DIR)) == sorted(
      cifar10.TRAIN_FILES + (cifar10.TEST_FILE, "batches.meta"))
  assert (d / cifar10.ARCHIVE).read_bytes() == body
  err = capsys.readouterr().err
  assert server.url("/c.tgz") in err and "MB/s" in err and "(100%)" in err, err
  assert len(err.splitlines()) < 10  # a few lines, not a flood
  # Fetched once: the next load reads the extracted batches, no request.
  again = cifar10.load_cifar10(str(d), num_valid=4, download=True,
                               download_url=server.url("/c.tgz"))
  np.testing.assert_array_equal(again.train_x, got.train_x)
  assert server.hits == ["/c.tgz"] and again.source.startswith("python batches")


def test_download_wrong_md5_keeps_nothing(tmp_path, server, archive, monkeypatch):
  body, _ = archive
  server.routes["/c.tgz"] = (body, None)
  monkeypatch.setattr(cifar10, "ARCHIVE_MD5", "0" * 32)
  d = tmp_path / "data"
  with pytest.raises(ValueError) as e:
    cifar10.load_cifar10(str(d), download=True, download_url=server.url("/c.tgz"))
  msg = str(e.value)
  assert "md5" in msg and "0" * 32 in msg and hashlib.md5(body).hexdigest() in msg
  assert "nothing was kept" in msg and cifar10.URL in msg
  _no_leftovers(d)


def test_truncated_download_keeps_nothing_and_a_retry_succeeds(tmp_path, server, archive):
  body, images = archive
  server.routes["/short.tgz"] = (body[:len(body) // 2], len(body))
  server.routes["/c.tgz"] = (body, None)
  d = tmp_path / "data"
  with pytest.raises(FileNotFoundError) as e:
    cifar10.load_cifar10(str(d), download=True, download_url=server.url("/short.tgz"))
  assert f"ended after {len(body) // 2} of {len(body)} bytes" in str(e.value)
  _no_leftovers(d)
  got = cifar10.load_cifar10(str(d), num_valid=0, download=True,
                             download_url=server.url("/c.tgz"))
  np.testing.assert_array_equal(got.test_x, images[cifar10.TEST_FILE])


def _assert_offline_message(msg, d, url):
  for part in (f"CIFAR-10 not found in {d}", f"DIR = {d}", os.path.join(str(d), cifar10.BATCHES_DIR),
               os.path.join(str(d), cifar10.ARCHIVE), f"download of {url} failed",
               cifar10.URL, cifar10.ARCHIVE_MD5, "--config.data.data_dir=",
               "--config.data.download=False", "--config.data.download_url="):
    assert part in msg, (part, msg)
  assert "shared" not in msg


def test_refused_connection_gives_the_offline_message_quickly(tmp_path, refused_url):
  d = tmp_path / "data"
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as e:  # main() turns it into exit status 2
    cifar10.load_cifar10(str(d), download=True, download_url=refused_url)
  assert time.monotonic() - start < 30
  _assert_offline_message(str(e.value), d, refused_url)
  assert "refused" in str(e.value).lower()
  assert not d.exists()  # the folder the failed try created is gone again


def test_server_that_never_answers_is_given_up_after_the_deadline(tmp_path, monkeypatch):
  monkeypatch.setattr(cifar10, "CONNECT_TIMEOUT_S", 1)
  monkeypatch.setattr(cifar10, "READ_TIMEOUT_S", 60)  # the deadline, not the socket, stops it
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  s.listen(1)  # connections complete in the kernel, no reply ever comes
  url = f"http://127.0.0.1:{s.getsockname()[1]}/c.tgz"
  try:
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no answer within 1 s"):
      cifar10.load_cifar10(str(tmp_path), download=True, download_url=url)
    assert time.monotonic() - start < 10
  finally:
    s.close()
  _no_leftovers(tmp_path)


def test_http_error_and_bad_url(tmp_path, server):
  with pytest.raises(FileNotFoundError, match="HTTP Error 404"):
    cifar10.load_cifar10(str(tmp_path), download=True, download_url=server.url("/missing"))
  with pytest.raises(ValueError, match="data.download_url='nonsense'"):
    cifar10.load_cifar10(str(tmp_path), download=True, download_url="nonsense")
  _no_leftovers(tmp_path)


def test_config_default_downloads_and_a_refused_url_gives_the_message(tmp_path, refused_url):
  from configs import cifar_micro
  c = cifar_micro.get_config()
  assert c.data.download is True and c.data.download_url == cifar10.URL
  c.data.data_dir = str(tmp_path / "data")
  c.data.download_url = refused_url
  with pytest.raises(FileNotFoundError) as e:
    data.load_images(c.data)
  _assert_offline_message(str(e.value), tmp_path / "data", refused_url)
  c.data.download = False
  with pytest.raises(FileNotFoundError) as e:
    data.load_images(c.data)
  assert "download=False" in str(e.value) and "--config.data.download=True" in str(e.value)
  assert "failed" not in str(e.value)


def test_interrupted_extraction_leaves_nothing_complete(tmp_path, monkeypatch):
  body, _ = _archive_bytes()
  cut = body[:len(body) * 2 // 3]  # a gzip stream that ends mid-file
  monkeypatch.setattr(cifar10, "ARCHIVE_MD5", hashlib.md5(cut).hexdigest())
  (tmp_path / cifar10.ARCHIVE).write_bytes(cut)
  with pytest.raises(ValueError, match="could not be extracted"):
    cifar10.load_cifar10(str(tmp_path), download=False)
  assert sorted(os.listdir(tmp_path)) == [cifar10.ARCHIVE]  # no batches folder, no .part


def test_extraction_stopped_midway_leaves_nothing_complete(tmp_path, archive, monkeypatch):
  body, images = archive
  (tmp_path / cifar10.ARCHIVE).write_bytes(body)
  real, written = tarfile.TarFile.makefile, []

  def makefile(self, tarinfo, targetpath):  # Ctrl-C after three files
    if len(written) == 3:
      raise KeyboardInterrupt
    written.append(targetpath)
    return real(self, tarinfo, targetpath)

  monkeypatch.setattr(tarfile.TarFile, "makefile", makefile)
  with pytest.raises(KeyboardInterrupt):
    cifar10.load_cifar10(str(tmp_path))
  assert len(written) == 3 and sorted(os.listdir(tmp_path)) == [cifar10.ARCHIVE]
  monkeypatch.setattr(tarfile.TarFile, "makefile", real)
  got = cifar10.load_cifar10(str(tmp_path), num_valid=0)  # the next run extracts it all
  np.testing.assert_array_equal(got.test_x, images[cifar10.TEST_FILE])


def test_stale_leftovers_are_removed_and_fresh_ones_kept(tmp_path, server, archive):
  body, _ = archive
  server.routes["/c.tgz"] = (body, None)
  old = time.time() - 2 * cifar10.STALE_S
  stale_file = tmp_path / f".{cifar10.ARCHIVE}.abc123.part"
  stale_file.write_bytes(b"half an archive")
  stale_dir = tmp_path / f".{cifar10.BATCHES_DIR}.def456.part" / cifar10.BATCHES_DIR
  stale_dir.mkdir(parents=True)
  (stale_dir / "data_batch_1").write_bytes(b"x")
  for p in (stale_file, stale_dir / "data_batch_1", stale_dir, stale_dir.parent):
    os.utime(p, (old, old))
  fresh = tmp_path / f".{cifar10.ARCHIVE}.live99.part"  # another process's live download
  fresh.write_bytes(b"in progress")
  cifar10.load_cifar10(str(tmp_path), num_valid=0, download=True,
                       download_url=server.url("/c.tgz"))
  assert sorted(os.listdir(tmp_path)) == sorted([cifar10.ARCHIVE, cifar10.BATCHES_DIR,
                                                 fresh.name])


def test_incomplete_batches_folder_is_moved_aside(tmp_path, archive):
  body, images = archive
  (tmp_path / cifar10.ARCHIVE).write_bytes(body)
  partial = tmp_path / cifar10.BATCHES_DIR
  partial.mkdir()
  (partial / "data_batch_1").write_bytes(b"an old, partial copy")
  got = cifar10.load_cifar10(str(tmp_path), num_valid=0)
  np.testing.assert_array_equal(got.test_x, images[cifar10.TEST_FILE])
  aside = [n for n in os.listdir(tmp_path) if n.startswith(cifar10.BATCHES_DIR + ".incomplete-")]
  assert len(aside) == 1
  assert (tmp_path / aside[0] / "data_batch_1").read_bytes() == b"an old, partial copy"


def test_load_images_without_download_fields_follows_the_config_default(tmp_path, refused_url,
                                                                         monkeypatch):
  monkeypatch.setattr(cifar10, "URL", refused_url)  # the default URL, made local
  with pytest.raises(FileNotFoundError, match="download of http://127.0.0.1"):
    data.load_images(types.SimpleNamespace(source="cifar10", data_dir=str(tmp_path)))
