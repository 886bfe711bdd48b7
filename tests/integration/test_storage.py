"""Storage and input fetching over real HTTP: moto's S3 server and a local web server."""

import base64
import http.server
import threading

import pytest

from bigmodel.core.errors import PermanentError, RetryableError
from bigmodel.storage import open_storage
from bigmodel.storage.fetch import Fetcher


@pytest.fixture(scope="module")
def web():
    """A web server on loopback serving /ok.bin, 404 elsewhere, 503 on /busy."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/ok.bin":
                body = b"\x00\x01hello"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(503 if self.path == "/busy" else 404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("kind", ["s3", "local"])
def test_put_get_exists_and_missing(kind, tmp_path, s3_endpoint, s3_bucket):
    url = f"s3://{s3_bucket}/some/prefix" if kind == "s3" else str(tmp_path / "store")
    store = open_storage(url, endpoint_url=s3_endpoint)
    uri = store.put("a/b.json", b'{"x": 1}', content_type="application/json")
    assert store.get("a/b.json") == b'{"x": 1}'
    assert store.exists("a/b.json") and not store.exists("a/c.json")
    assert uri == store.uri("a/b.json")
    if kind == "s3":
        assert uri == f"s3://{s3_bucket}/some/prefix/a/b.json"
    with pytest.raises(PermanentError) as info:
        store.get("a/c.json")
    assert info.value.code == "object_not_found"


def test_local_storage_refuses_keys_outside_its_folder(tmp_path):
    store = open_storage(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="escapes the storage folder"):
        store.put("../evil", b"x")
    with pytest.raises(ValueError, match="use s3://bucket/prefix or a local folder"):
        open_storage("gs://bucket/x")


def test_fetch_s3_http_and_data(s3_endpoint, s3_bucket, web):
    store = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    store.put("img.bin", b"abc")
    f = Fetcher(endpoint_url=s3_endpoint, timeout_s=5, max_bytes=1000)
    assert f.fetch(f"s3://{s3_bucket}/img.bin") == b"abc"
    assert f.fetch(f"{web}/ok.bin") == b"\x00\x01hello"
    assert f.fetch("data:image/png;base64," + base64.b64encode(b"xyz").decode()) == b"xyz"

    for uri, code in [
        (f"s3://{s3_bucket}/missing.jpg", "object_not_found"),
        (f"s3://no-such-bucket-{s3_bucket}/k", "object_not_found"),
        (f"{web}/missing", "object_not_found"),
        ("data:image/png;base64,@@@", "invalid_input"),
    ]:
        with pytest.raises(PermanentError) as info:
            f.fetch(uri)
        assert info.value.code == code, uri
    with pytest.raises(RetryableError, match="HTTP 503"):
        f.fetch(f"{web}/busy")
    with pytest.raises(PermanentError, match="over the limit of 2 bytes"):
        Fetcher(endpoint_url=s3_endpoint, max_bytes=2).fetch(f"s3://{s3_bucket}/img.bin")
