"""Connecting to a Ray cluster: the address checked before anything waits on it, token
authentication passed the way Ray documents it for clients, and every failure named in one
line (cluster down, not a Ray head, authentication, version mismatch, no node here).

Ray 2.52+ authenticates with a token (``RAY_AUTH_MODE=token`` plus the token from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``). Ray
2.60 turns token mode on by itself for a local instance and for ``auto`` when a token file
exists, but not for an explicit address: a client then sends no token and Ray retries for
20 s before a bare "Failed to connect". So wmlab asks the head first (one gRPC call, ms):
a head that refuses the call without a token gets token mode (if this machine has a token),
a head without authentication gets it off (a driver in token mode rejects that cluster's
calls back to it). What Ray needs is then set before ``ray.init``, as Ray itself does for
``auto``.

Everything that talks to Ray here uses what Ray's own CLI uses (``GcsClient``, its node
scan); where an older Ray lacks a piece, that check is skipped and ``ray.init`` decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from wmlab.errors import WmlabError

AUTH_MODE = "RAY_AUTH_MODE"
NOT_HERE = "or use es.engine = process"
GIVE_HEAD = ("give the address `ray start --head` printed on the head (its `ray start "
             f"--address='<ip>:<port>'` line), {NOT_HERE}")
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WmlabError("es.engine = ray needs Ray: pip install 'wmlab[ray]' (or use "
                         "es.engine = process)") from None
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """host:port (a ``ray://`` prefix allowed), or a one-line error."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise WmlabError(f"es.ray_address '{address}' is not host:port (e.g. 10.0.0.5:6379), "
                         "'auto' or empty for a local Ray instance")
    return host.strip("[]"), int(port)


def check_ray_address(address: str, timeout: float = 5.0) -> str | None:
    """Refuse an address that would fail, with its cause, before Ray waits on it for
    minutes; the ``RAY_AUTH_MODE`` the connection needs (None: leave it as it is)."""
    if not address or address == "local":
        return None
    if address == "auto":
        resolved = resolve_auto()
        return None if resolved is None else _check(resolved, timeout, "--ray-address auto")
    return _check(address, timeout, "es.ray_address")


def _check(address: str, timeout: float, named: str) -> str | None:
    host, port = parse_address(address)
    _check_answers(address, host, port, timeout)
    if "://" in address:  # Ray Client (ray://host:10001) speaks its own protocol
        return None
    return _check_head(address, named)


def _check_answers(address: str, host: str, port: int, timeout: float) -> None:
    """Something listens at host:port and speaks gRPC (HTTP/2), as a Ray head's GCS does."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(HTTP2_PREFACE)
            reply = conn.recv(9)
    except OSError as exc:
        raise WmlabError(f"Ray cluster at {address} does not answer "
                         f"({exc.strerror or exc or 'timed out'}){_advertised_hint()}: start "
                         f"it with `ray start --head --port={port}`, check the address, "
                         f"{NOT_HERE}") from None
    if len(reply) < 4 or reply[3] != 0x04:  # an HTTP/2 server answers with SETTINGS first
        raise WmlabError(f"{address} answers but is not a Ray head (it does not speak gRPC)"
                         f"{_advertised_hint()}: {GIVE_HEAD}")


def _check_head(address: str, named: str) -> str | None:
    """Ask the head: its authentication, its versions, whether this machine is one of its
    nodes. The auth mode this process must connect in."""
    ray = import_ray()
    if ray.is_initialized() or not _has_auth_support():
        return None  # a live connection keeps its mode; Ray before 2.52 has no tokens
    mode = _auth_needed(address)
    # the checks below run in that mode: a head with tokens refuses every call without one
    with _auth_mode(mode) if mode else contextlib.nullcontext():
        client = _open_gcs(address)
        _check_versions(address, client, ray.__version__)
        _check_node_here(address, client, named, mode)
    return mode


# ---------------------------------------------------------------------------------------------
# Authentication


def _has_auth_support() -> bool:
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # noqa: F401
    except ImportError:
        return False
    return True


def set_auth_mode(mode: str | None) -> None:
    """Put ``RAY_AUTH_MODE`` (None: unset) into this process's environment and make Ray read
    it again: Ray caches its config when imported, and switches it this way itself
    (``ray._private.authentication.authentication_token_setup._enable_token_auth``)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    if mode is None:
        os.environ.pop(AUTH_MODE, None)
    else:
        os.environ[AUTH_MODE] = mode
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()  # the token may have changed too


@contextlib.contextmanager
def _auth_mode(mode: str) -> Iterator[None]:
    """``mode`` for one probe; the environment is left as it was."""
    before = os.environ.get(AUTH_MODE)
    set_auth_mode(mode)
    try:
        yield
    finally:
        set_auth_mode(before)


def _auth_needed(address: str) -> str | None:
    """The mode the head needs this process in ("token" or "disabled"; None: a mode of the
    user's own, such as k8s, left as it is), or a one-line error."""
    chosen = os.environ.get(AUTH_MODE)
    if chosen not in (None, "token", "disabled"):
        return None
    try:
        with _auth_mode("disabled"):
            _open_gcs(address)
    except _AuthRefused:
        _check_token(address, chosen)
        return "token"
    if chosen == "token":
        raise WmlabError(f"the Ray cluster at {address} has token authentication off, but "
                         f"{AUTH_MODE}=token here (a driver in token mode refuses that "
                         f"cluster's calls): unset {AUTH_MODE}, or start the cluster with a "
                         "token")
    return "disabled"


def _check_token(address: str, chosen: str | None) -> None:
    """This machine has a token and the head takes it, or a one-line error."""
    if chosen == "disabled":
        raise WmlabError(f"the Ray cluster at {address} requires token authentication but "
                         f"{AUTH_MODE}=disabled here: unset {AUTH_MODE} (wmlab then sends "
                         "this machine's token)")
    source = token_source()
    if source is None:
        raise WmlabError(f"the Ray cluster at {address} requires token authentication and "
                         "this machine has no token: copy the head's token (`ray "
                         "get-auth-token` on the head) to ~/.ray/auth_token here, or set "
                         "RAY_AUTH_TOKEN")
    try:
        with _auth_mode("token"):
            _open_gcs(address)
    except _AuthRefused:
        raise WmlabError(f"the Ray cluster at {address} rejects the token in {source} (it "
                         f"is not the head's): {_replace_token(source)}") from None


def _replace_token(source: str) -> str:
    """How to put the head's token where Ray reads this machine's (the first place wins)."""
    head = "the head's token (`ray get-auth-token` on the head)"
    if source == "RAY_AUTH_TOKEN":
        return f"set RAY_AUTH_TOKEN to {head}, or unset it to use ~/.ray/auth_token"
    if source.startswith("RAY_AUTH_TOKEN_PATH"):
        return f"put {head} in that file, or unset RAY_AUTH_TOKEN_PATH"
    return f"copy {head} to {source}"


def token_source() -> str | None:
    """Where Ray takes this machine's token from (its order), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        with contextlib.suppress(OSError), open(path) as handle:
            if handle.read().strip():
                return f"RAY_AUTH_TOKEN_PATH ({path})"
        raise WmlabError(f"RAY_AUTH_TOKEN_PATH is {path}, which cannot be read or is empty: "
                         "point it to the cluster's token file, or unset it")
    default = os.path.expanduser("~/.ray/auth_token")
    with contextlib.suppress(OSError), open(default) as handle:
        if handle.read().strip():
            return default
    return None


class _AuthRefused(Exception):
    """The head refused the call: token missing or wrong."""


def _open_gcs(address: str) -> Any:
    """A client of the head's GCS (one call: its cluster id), in the current auth mode."""
    import ray
    from ray._raylet import GcsClient

    refused = getattr(ray.exceptions, "AuthenticationError", ())
    try:
        with _quiet_stderr():  # Ray's C++ client logs each refusal; the error below says it
            return GcsClient(address=address)
    except refused:
        if os.environ.get(AUTH_MODE) not in (None, "token", "disabled"):
            raise WmlabError(f"the Ray cluster at {address} refuses this machine with "
                             f"{AUTH_MODE}={os.environ[AUTH_MODE]}: check that mode's "
                             f"credentials, {NOT_HERE}") from None
        raise _AuthRefused() from None
    except Exception:  # gRPC but no GCS: a raylet's, an agent's or a Ray Client's port
        raise WmlabError(f"{address} answers but is not a Ray head (it speaks gRPC, not as "
                         f"Ray's GCS){_advertised_hint()}: {GIVE_HEAD}") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """fd 2 to /dev/null for a moment: Ray's C++ logging writes there, not to sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------
# Versions and nodes


def _check_versions(address: str, client: Any, ray_version: str) -> None:
    try:
        raw = client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=10)
        cluster = json.loads(raw) if raw else {}
    except Exception:  # an older head without metadata: ray.init checks on its own
        return
    problem = version_mismatch(cluster.get("ray_version"), cluster.get("python_version"),
                               ray_version, ".".join(map(str, sys.version_info[:3])),
                               os.environ.get("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL",
                                              "patch"))
    if problem:
        raise WmlabError(f"the Ray cluster at {address} {problem}")


def version_mismatch(cluster_ray: str | None, cluster_python: str | None, ray_version: str,
                     python_version: str, match_level: str = "patch") -> str | None:
    """What differs between the cluster and this process, by Ray's rule (Ray exactly;
    Python to the patch, or to the minor version with match_level 'minor'), or None."""
    if not cluster_ray or not cluster_python:
        return None
    parts = 2 if match_level == "minor" else 3
    same_python = cluster_python.split(".")[:parts] == python_version.split(".")[:parts]
    if cluster_ray == ray_version and same_python:
        return None
    return (f"runs Ray {cluster_ray} on Python {cluster_python}, this machine Ray "
            f"{ray_version} on Python {python_version}: install the cluster's versions here "
            f"(pip install 'ray[default]=={cluster_ray}' on Python {cluster_python}), or "
            "start the cluster with this machine's")


@dataclass(frozen=True)
class Node:
    node_id: str  # hex, as ray.nodes() and the runtime context give it
    ip: str
    head: bool


def cluster_nodes(client: Any) -> list[Node]:
    """The cluster's live nodes, as its GCS lists them."""
    alive = 0  # GcsNodeInfo.GcsNodeState.ALIVE
    return [Node(info.node_id.hex(), info.node_manager_address, info.is_head_node)
            for info in client.get_all_node_info(timeout=10).values() if info.state == alive]


def _check_node_here(address: str, client: Any, named: str, mode: str | None) -> None:
    """A driver attaches to a raylet of the cluster on its own machine: without one,
    ``ray.init`` looks for it for a minute and fails. Ray's own scan of local raylets."""
    try:
        from ray._private.services import find_node_ids

        nodes = cluster_nodes(client)
        local = set(find_node_ids())
    except Exception:  # an older Ray: ray.init checks on its own
        return
    if not nodes or local & {n.node_id for n in nodes}:
        return
    port = address.rsplit(":", 1)[-1]
    heads = [f"{n.ip}:{port}" for n in nodes if n.head]
    join = f"{AUTH_MODE}=token " if mode == "token" else ""
    raise WmlabError(f"this machine runs no node of the Ray cluster at {address} (its head "
                     f"advertises {', '.join(heads) or 'no address'}; {named} reaches it, but "
                     "a driver needs a node of the cluster beside it): run wmlab on the "
                     f"head, or join this machine first with `{join}ray start "
                     f"--address={heads[0] if heads else address}`")


def _advertised_hint() -> str:
    """'; the Ray head on this machine advertises ip:port' when one runs here."""
    found = sorted(local_heads())
    return f"; the Ray head on this machine advertises {', '.join(found)}" if found else ""


def local_heads() -> set[str]:
    """The GCS addresses of the Ray clusters with a process on this machine, by Ray's own
    scan of process command lines, scanned now (Ray caches a scan for the process's life,
    so a long-lived process would see clusters long gone); empty where Ray cannot scan."""
    try:
        from ray._private.services import find_gcs_addresses

        find_gcs_addresses.cache_clear()
        return set(find_gcs_addresses())
    except Exception:
        return set()


def resolve_auto() -> str | None:
    """The address ``auto`` means here (RAY_ADDRESS, the last `ray start`, a running head),
    found as Ray finds it but now; None where this Ray cannot say (ray.init then decides)."""
    import_ray()
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:
        return None
    local_heads()  # a fresh scan for Ray's lookup below
    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:
        raise WmlabError("--ray-address auto found no Ray cluster on this machine: start one "
                         "with `ray start --head`, give a cluster's address (host:port), "
                         f"{NOT_HERE}") from None
    except Exception:  # another Ray's signature
        return None
    return found if found and "://" not in found else None


# ---------------------------------------------------------------------------------------------
# Connecting


def connect(address: str, workers: int) -> Any:
    """``ray.init`` for the engine: a local instance of ``workers`` CPUs (no address) or the
    cluster at ``address`` (host:port or auto) with the auth mode it needs; the ray module."""
    ray = import_ray()
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "logging_level": "ERROR"}
    if address:
        target, named = address, "es.ray_address"
        if address == "auto":  # resolved here: ray.init's scan of running clusters is cached
            target, named = resolve_auto() or address, "--ray-address auto"
        options["address"] = target
        mode = None if target in ("auto", "local") else _check(target, 5.0, named)
        if mode is not None:
            set_auth_mode(mode)  # left set, as Ray leaves it for auto: calls back need it too
    else:
        options["num_cpus"] = max(1, workers)
    try:
        ray.init(**options)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise WmlabError(f"cannot connect to Ray at '{address or 'local'}': {_line(exc)}; "
                         f"start the cluster, {NOT_HERE}") from None
    return ray


def _line(exc: BaseException) -> str:
    """An exception's message on one line (Ray's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
