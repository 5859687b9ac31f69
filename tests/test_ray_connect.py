"""Joining a Ray cluster (`connect_ray` with an address): a failure names the address and the
likely cause (token authentication, address/port, cluster down, version mismatch, an HTTP
server at the port) and comes within about `runtime.connect_timeout_s`. Against a real
token-auth head started here, a client without the token (or with a wrong one) gets the token
hint, and one with `RAY_AUTH_MODE=token` and the token joins."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from edgesam.config import RuntimeConfig
from edgesam import cluster
from edgesam.cluster import RAY_GCS_WAIT_ENV, RayConnectionError, connect_ray

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_host_port() -> None:
    assert cluster.host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster.host_port("ray://head:10001") == ("head", 10001)
    assert cluster.host_port("[::1]:6379") == ("::1", 6379)
    assert cluster.host_port("auto") is None and cluster.host_port("local") is None


def test_nothing_listening_fails_fast_naming_the_address() -> None:
    import ray

    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RayConnectionError) as err:
        connect_ray(RuntimeConfig(ray_address=address, connect_timeout_s=2))
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert address in msg and "not running" in msg and "port" in msg
    assert isinstance(err.value, ConnectionError) and not ray.is_initialized()


SETTINGS = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # an empty HTTP/2 SETTINGS frame, as gRPC servers send first


@contextmanager
def server(reply: bytes) -> Iterator[str]:
    """A TCP server on 127.0.0.1 that answers every connection with `reply`; its address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop_event = threading.Event()

    def serve() -> None:
        while not stop_event.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):  # a client that hangs up early
                conn.settimeout(1)
                conn.recv(1024)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop_event.set()
        thread.join()
        sock.close()


@pytest.fixture
def listening() -> Iterator[str]:
    """An address where a gRPC-like server answers (ray.init itself is faked)."""
    with server(SETTINGS) as address:
        yield address


def test_http_server_at_the_address_fails_fast(monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be reached"))
    for reply in (b"HTTP/1.1 400 Bad Request\r\n\r\n", b"<!DOCTYPE HTML>\n<html>"):
        with server(reply) as address:
            t0 = time.monotonic()
            with pytest.raises(RayConnectionError, match="no gRPC server") as err:
                connect_ray(RuntimeConfig(ray_address=address))
            assert time.monotonic() - t0 < 3 and address in str(err.value) and "6379" in str(err.value)


def fail_with(monkeypatch, exc: BaseException, seen: dict) -> None:
    import ray

    def init(**kwargs):
        seen["wait"] = os.environ.get(RAY_GCS_WAIT_ENV)
        raise exc

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv(RAY_GCS_WAIT_ENV, raising=False)
    for name in AUTH_ENV:
        monkeypatch.delenv(name, raising=False)


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


def test_auth_failure_names_token_settings(monkeypatch, listening) -> None:
    # What Ray 2.60 raises when the head uses tokens and this process sends none.
    exc = chained(ConnectionError(f"Failed to connect to Ray cluster at {listening}"),
                  RuntimeError("Failed to connect to GCS. Last connection error: ray.exceptions."
                               "AuthenticationError: RPC error: InvalidAuthToken: Authentication "
                               "token is missing or incorrect."))
    seen: dict = {}
    fail_with(monkeypatch, exc, seen)
    with pytest.raises(RayConnectionError) as err:
        connect_ray(RuntimeConfig(ray_address=listening, connect_timeout_s=3))
    msg = str(err.value)
    assert listening in msg and "Likely cause: token authentication" in msg
    assert "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN" in msg and "auth_token" in msg
    assert "RAY_AUTH_MODE=(unset)" in msg  # this process's side, never the token itself
    assert err.value.__cause__ is exc
    assert seen["wait"] == "3" and RAY_GCS_WAIT_ENV not in os.environ  # Ray's retries bounded, then restored


def test_version_mismatch_and_unknown_failures(monkeypatch, listening) -> None:
    seen: dict = {}
    fail_with(monkeypatch, RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.59.0"), seen)
    with pytest.raises(RayConnectionError, match="Likely cause: a Ray or Python version mismatch") as err:
        connect_ray(RuntimeConfig(ray_address=listening))
    import ray

    assert f"here: Ray {ray.__version__}, Python" in str(err.value)

    fail_with(monkeypatch, ConnectionError("Failed to connect to Ray cluster"), seen)
    monkeypatch.setenv(RAY_GCS_WAIT_ENV, "7")  # the user's own setting wins
    with pytest.raises(RayConnectionError) as err:
        connect_ray(RuntimeConfig(ray_address=listening))
    msg = str(err.value)
    assert "Likely cause" not in msg
    assert all(k in msg for k in ("token authentication", "the address", "ray status", "versions"))
    assert seen["wait"] == "7"


def test_gcs_timeout_names_a_wrong_port(monkeypatch, listening) -> None:
    exc = chained(ConnectionError("Failed to connect to Ray cluster"),
                  RuntimeError("Failed to connect to GCS. Last connection error: ray.exceptions.RpcError: "
                               "Timed out while waiting for GCS to become available."))
    fail_with(monkeypatch, exc, {})
    with pytest.raises(RayConnectionError, match="Likely cause: no Ray GCS answered"):
        connect_ray(RuntimeConfig(ray_address=listening))


def test_other_errors_pass_through(monkeypatch, listening) -> None:
    fail_with(monkeypatch, ValueError("bad"), {})
    with pytest.raises(ValueError, match="bad"):
        connect_ray(RuntimeConfig(ray_address=listening))


# -- a real head with token authentication -------------------------------------------------

# edgesam.cluster needs only Ray and the config (no torch: seconds per client on a loaded machine).
CLIENT = """
import sys
import ray
from edgesam import cluster
from edgesam.config import RuntimeConfig
try:
    cluster.connect_ray(RuntimeConfig(ray_address=sys.argv[1], connect_timeout_s=3))
except cluster.RayConnectionError as exc:
    print("FAILED", exc)
    sys.exit(3)
print("JOINED", ray.cluster_resources().get("CPU"))
ray.shutdown()
"""


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def clients(address: str, home: Path, *envs: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """One client process per environment, concurrently; their outcomes."""
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, address], env=clean_env(home, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for extra in envs]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_token_auth_head(tmp_path: Path) -> None:
    token = secrets.token_hex(32)
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    log = tmp_path / "head.log"
    head_home, client_home = tmp_path / "head", tmp_path / "client"
    head_home.mkdir(), client_home.mkdir()
    args = [str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
            "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats",
            "--temp-dir", temp_dir, "--block"]
    t_start = time.monotonic()
    with log.open("w") as out:
        head = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=clean_env(head_home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"`ray start --head` did not come up here:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        started = time.monotonic()
        address = f"127.0.0.1:{port}"

        t0 = time.monotonic()
        denied, wrong, joined = clients(
            address, client_home,
            {},  # no RAY_AUTH_MODE, no token: Ray's bare "Failed to connect to Ray cluster" before
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        for failed in (denied, wrong):
            assert failed.returncode == 3, failed.stdout + failed.stderr
            assert f"Could not join the Ray cluster at {address}" in failed.stdout
            assert "Likely cause: token authentication" in failed.stdout
        assert "RAY_AUTH_MODE=(unset)" in denied.stdout and "RAY_AUTH_TOKEN set" in wrong.stdout
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert "JOINED 1.0" in joined.stdout
        assert time.monotonic() - t0 < 90
        print(f"head up in {started - t_start:.1f} s, three clients in {time.monotonic() - t0:.1f} s")
    finally:
        t_stop = time.monotonic()
        stop(head)
        print(f"head stopped in {time.monotonic() - t_stop:.1f} s")
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops its GCS, raylet and agents), then SIGKILL to
    whatever is left of its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL below
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_refused_join_is_not_retried_as_transient_io():
    from edgesam.cluster import RayConnectionError
    from flows.caching import is_transient_io_error

    assert is_transient_io_error(ConnectionResetError())
    assert not is_transient_io_error(RayConnectionError("token missing"))
