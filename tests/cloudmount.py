"""A real cloud mount for tests: moto's S3 server on loopback, mounted with s3fs (FUSE).

``S3Server`` runs ``python -m moto.server`` (PyPI ``moto[server]``, pinned in
requirements-dev.txt) on a free 127.0.0.1 port and counts the requests in its log (one
werkzeug line per request). ``S3Mount`` mounts a bucket with s3fs (Debian package ``s3fs``,
in the Makefile's APT_PACKAGES) as root, path-style against that endpoint; :meth:`kill`
SIGKILLs s3fs (the mount point then answers ENOTCONN, as a crashed FUSE daemon does),
:meth:`remount` unmounts and mounts again. Other hosts write through the S3 API
(:meth:`S3Server.client`, boto3), as a gateway app on another machine would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ACCESS_KEY, SECRET_KEY = "testing", "testing-secret"
#: An s3fs LIST: a bucket GET with a delimiter/prefix query (ListObjects).
_LIST_RE = re.compile(r'"GET /[^/? ]+/?\?[^"]*(delimiter=|list-type=|prefix=)')
_REQUEST_RE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) ')


def skip_reason() -> str:
    """Why a real s3fs mount cannot be made here, or ""."""
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is absent (no FUSE in this machine or container)"
    if shutil.which("s3fs") is None:
        return "s3fs is not installed (Debian package s3fs: run `make test-deps`)"
    if os.geteuid() != 0:
        return "mounting s3fs needs root here"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "moto[server] is not installed (requirements-dev.txt)"
    return ""


class S3Server:
    """moto's S3 server on a free loopback port, its log in ``log``."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "moto.log"
        self._log_fh = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server did not start: {self.log.read_text()[-2000:]}")

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def lists(self, lines: list[str] | None = None) -> int:
        """LIST requests (ListObjects) the server answered so far."""
        return sum(1 for line in lines or self.lines() if _LIST_RE.search(line))

    def requests(self) -> int:
        return sum(1 for line in self.lines() if _REQUEST_RE.search(line))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_fh.close()


class S3Mount:
    """A bucket mounted with s3fs at ``path`` (foreground process, so it can be killed)."""

    def __init__(
        self,
        server: S3Server,
        bucket: str,
        path: Path,
        workdir: Path,
        options: tuple[str, ...] = (),
    ) -> None:
        self.server, self.bucket, self.path = server, bucket, path
        self.options = options
        self.passwd = workdir / f"passwd-{bucket}"
        self.passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        self.passwd.chmod(0o600)
        self.log = workdir / f"s3fs-{bucket}-{path.name}.log"
        path.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.mount()

    def mount(self) -> None:
        options = [
            f"url={self.server.endpoint}",
            "use_path_request_style",
            f"passwd_file={self.passwd}",
            *self.options,
        ]  # s3fs's defaults otherwise: attributes cached 900 s (stat_cache_expire)
        args = ["s3fs", self.bucket, str(self.path), "-f"]
        for option in options:
            args += ["-o", option]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if os.path.ismount(self.path):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"s3fs did not mount: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL s3fs: the mount point now answers ENOTCONN."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def unmount(self) -> None:
        self.kill()
        subprocess.run(["fusermount", "-u", "-z", str(self.path)], capture_output=True)
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)

    def remount(self) -> None:
        self.unmount()
        self.mount()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["fusermount", "-u", str(self.path)], capture_output=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.unmount()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_mount(s3_server: S3Server, tmp_path: Path) -> Iterator[S3Mount]:
    """A fresh bucket mounted at ``tmp_path/mnt``."""
    bucket = f"b{time.monotonic_ns() % 10**12}"
    s3_server.client().create_bucket(Bucket=bucket)
    mount = S3Mount(s3_server, bucket, tmp_path / "mnt", tmp_path)
    try:
        yield mount
    finally:
        mount.close()
