"""A local S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1.

    with s3_server() as endpoint:        # http://127.0.0.1:<port>, AWS_* set, bucket created
        Storage("s3://nwh/prefix")

Loaded by path from a test module (the tests are not a package), like the sibling helpers:
`spec_from_file_location("s3_server", HERE.parent / "s3_server.py")`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

BUCKET = "nwh"
MISSING = ("moto", "s3fs", "upath")  # moto[server], s3fs, universal-pathlib


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in MISSING if importlib.util.find_spec(name) is None]


@contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[str]:
    """Start the server on a free port with moto's state reset, point the AWS_* environment at
    it (dummy credentials, us-east-1), create `bucket`; yield the endpoint URL; restore the
    environment and stop."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        import urllib.request

        import fsspec
        import s3fs

        # moto keeps its state per process, not per server: start from an empty one, so a
        # bucket an earlier test module left behind is not there
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset",
                                                      method="POST"), timeout=30).close()
        # filesystems are cached by their arguments, and the endpoint comes from the
        # environment: one cached for an earlier server would still point at its port
        s3fs.S3FileSystem.clear_instance_cache()

        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir(bucket)
        yield endpoint
    finally:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
