"""Connecting to Ray: an existing cluster (`RAY_ADDRESS`) or a quiet local one."""

from __future__ import annotations

import logging
import math
import os
import platform
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgesam.config import RuntimeConfig

log = logging.getLogger(__name__)

# Ray's retry budget (attempts about one second apart) for reaching the GCS of an existing
# cluster; read by ray._private.node at every ray.init.
RAY_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
AUTH_MARKERS = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError", "authentication token")


class RayConnectionError(ConnectionError):
    """Joining a Ray cluster failed; the message names the address and the likely causes."""


def connect_ray(runtime: RuntimeConfig) -> None:
    """Reuse an initialized Ray, join `runtime.ray_address` / `RAY_ADDRESS`, else start locally."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        join_ray(address, runtime.connect_timeout_s)
        return
    log.info("starting a local Ray (%d CPUs, object store %d MiB)",
             os.cpu_count() or 1, runtime.object_store_mb)
    ray.init(
        address="local",  # without it, Ray joins the last cluster `ray start` left on this machine
        num_cpus=os.cpu_count() or 1,
        object_store_memory=runtime.object_store_mb * 1024**2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


def join_ray(address: str, timeout_s: float = 20.0) -> None:
    """`ray.init(address=...)`, failing within about `timeout_s` with a `RayConnectionError`
    that names the address and the likely cause (token authentication, a wrong address or
    port, a cluster that is not running, a Ray or Python version mismatch)."""
    import ray

    log.info("connecting to the Ray cluster at %s", address)
    target = host_port(address)
    if target is not None:
        try:
            reply = _probe(target, timeout_s)
        except OSError as exc:
            raise RayConnectionError(
                f"Could not join the Ray cluster at {address}: nothing accepts connections at "
                f"{target[0]}:{target[1]} ({exc or type(exc).__name__}). Likely causes: the cluster "
                "is not running (on its head: `ray status`), or a wrong host or port (the head's GCS "
                "port, `ray start --head --port`, default 6379; `ray://host:10001` for Ray Client; "
                "not the dashboard's 8265), or a firewall between here and the head."
            ) from exc
        if reply and not _is_http2_settings(reply):  # Ray would wait ~40 s per retry there
            raise RayConnectionError(
                f"Could not join the Ray cluster at {address}: the server at {target[0]}:{target[1]} "
                f"is no gRPC server (it answered {reply[:24]!r}), so not Ray's GCS: a wrong port, "
                "e.g. the dashboard / Jobs API (8265; `ray job submit` takes "
                "that one). Give the head's GCS port (`ray start --head --port`, default 6379) or "
                "ray://host:10001 for Ray Client."
            )
    try:
        with _env_default(RAY_GCS_WAIT_ENV, str(max(1, math.ceil(timeout_s)))):
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    except (ConnectionError, RuntimeError, TimeoutError, ray.exceptions.RayError) as exc:
        raise RayConnectionError(explain_connection_failure(address, exc)) from exc


def _probe(target: tuple[str, int], timeout_s: float) -> bytes:
    """Connect to `target` (OSError when nothing accepts) and send the HTTP/2 preface that
    every gRPC server (Ray's GCS, Ray Client) answers with a SETTINGS frame; the first bytes
    of the reply, empty when none comes within a second or two."""
    with socket.create_connection(target, timeout=timeout_s) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return b""  # a TLS server expects a handshake first; leave it to Ray
        conn.settimeout(min(timeout_s, 2.0))
        try:
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            return conn.recv(64)
        except OSError:
            return b""


def _is_http2_settings(reply: bytes) -> bool:
    """Whether `reply` starts with an HTTP/2 frame header of type SETTINGS (a server's first frame)."""
    return len(reply) >= 9 and reply[3] == 0x04


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address (`host:port`, `ray://host:port`, `[v6]:port`); None for
    `auto` / `local` / anything without a port, which Ray resolves itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def explain_connection_failure(address: str, exc: BaseException) -> str:
    """The message of a failed join: what Ray said, the likely cause first, what to check."""
    chain, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    auth = ("token authentication: the cluster requires a token and this process sent none or "
            "another one. Set RAY_AUTH_MODE=token and the cluster's token here, either "
            "RAY_AUTH_TOKEN=<token> or the file ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH=<file>); "
            "`ray get-auth-token` on the head prints it. Here: " + auth_state() + ".")
    address_hint = ("the address: the head's GCS host:port (`ray start --head --port`, default 6379) "
                    "or ray://host:10001 for Ray Client, not the dashboard (8265)")
    running = "the cluster is running: `ray status` on its head"
    version = (f"the same Ray and Python versions as the cluster (here: Ray {_ray_version()}, "
               f"Python {platform.python_version()})")
    if any(m in text for m in AUTH_MARKERS):
        likely, others = auth, [address_hint, running, version]
    elif "Timed out while waiting for GCS" in text:
        likely = ("no Ray GCS answered at this address: a wrong port (another service listens "
                  "there), or a head that is still starting or overloaded")
        others = [address_hint, running]
    elif "Version mismatch" in text:
        likely, others = "a Ray or Python version mismatch: " + version, []
    else:
        likely = None
        others = ["token authentication (RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
                  "or ~/.ray/auth_token; `ray get-auth-token` on the head prints it; here: "
                  + auth_state() + ")", address_hint, running, version]
    lines = [f"Could not join the Ray cluster at {address} ({first})."]
    if likely:
        lines.append(f"Likely cause: {likely}")
    if others:
        lines.append(("Else check " if likely else "Check ") + "; ".join(others) + ".")
    return "\n".join(lines)


def auth_state() -> str:
    """This process's side of Ray's token authentication, without the token itself."""
    mode = os.environ.get("RAY_AUTH_MODE")
    where = []
    if os.environ.get("RAY_AUTH_TOKEN"):
        where.append("RAY_AUTH_TOKEN set")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        where.append(f"RAY_AUTH_TOKEN_PATH={path} ({'exists' if Path(path).is_file() else 'missing'})")
    default = Path.home() / ".ray" / "auth_token"
    where.append(f"{default} {'exists' if default.is_file() else 'missing'}")
    return f"RAY_AUTH_MODE={mode if mode is not None else '(unset)'}, " + ", ".join(where)


def _ray_version() -> str:
    import ray

    return ray.__version__


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """`name=value` in the environment for the block, unless the user set `name`."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def use_gpu(runtime: RuntimeConfig) -> bool:
    """`runtime.use_gpu`, or whether the connected cluster has GPUs when it is None."""
    import ray

    if runtime.use_gpu is not None:
        return runtime.use_gpu
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def resolve_device(runtime: RuntimeConfig) -> RuntimeConfig:
    """`runtime` with `use_gpu` decided once for a whole run (cache keys depend on it): as
    configured, else whether the cluster at the configured address has GPUs, else this machine."""
    if runtime.use_gpu is not None:
        return runtime
    if runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        connect_ray(runtime)
        gpu = use_gpu(runtime)
    else:
        import torch

        gpu = torch.cuda.is_available()
    return runtime.model_copy(update={"use_gpu": gpu})
