"""A real Ray cluster, started here with `ray start` as a cluster user starts one: a head
with token authentication on (Ray's default where a token exists) and a second node on this
machine with its own temp dir. wmlab connects by the head's address and by auto, its
generations equal the process engine's, jobs land on both nodes, and every failure to
connect is named in one line. The cluster is stopped by its own processes (the sessions of
the `ray start`s run here), and none of them may be left."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import wmlab
from agent_fixtures import live_processes, make_run
from wmlab.agent import workload_from_config
from wmlab.cli import main
from wmlab.errors import WmlabError
from wmlab.evaluators import Evaluator
from wmlab.raycluster import check_ray_address, local_heads

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'wmlab[ray]'): "
                          "no cluster to start")
pytestmark = [pytest.mark.ray_cluster, pytest.mark.ray]

START_TIMEOUT = 180  # seconds for one `ray start` on a loaded 2-core machine


@dataclass
class Cluster:
    root: Path  # the nodes' temp dirs and the token live here
    token: Path
    env: dict[str, str]
    sessions: list[int] = field(default_factory=list)  # one per `ray start`
    address: str = ""  # as the head advertises it (its node IP, not 127.0.0.1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _ray_start(cluster: Cluster, name: str, *args: str, env: dict[str, str]) -> str:
    """`ray start` in a session of its own: every process it starts (GCS, raylet, agents,
    workers) is in that session, which is how the cluster is stopped. Its output."""
    command = [str(Path(sys.executable).with_name("ray")), "start", *args,
               f"--temp-dir={cluster.root / name}", "--disable-usage-stats",
               "--object-store-memory=100000000", f"--metrics-export-port={_free_port()}",
               f"--dashboard-agent-listen-port={_free_port()}"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    cluster.sessions.append(proc.pid)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"`ray start` ({name}) took over {START_TIMEOUT} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"`ray start` ({name}) failed:\n{out[-3000:]}")
    return out


def _members(sessions: list[int]) -> list[int]:
    """Live processes (not zombies) of the given sessions, from /proc."""
    return [pid for pid, fields in live_processes().items() if int(fields[3]) in sessions]


def _stop(sessions: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL, every process of these sessions; those still alive."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        for pid in _members(sessions):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _members(sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _members(sessions)


def _new_cluster() -> Cluster:
    # a short root: Ray's socket paths under the temp dir must fit in 107 bytes
    root = Path(tempfile.mkdtemp(prefix="wr-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    # the cluster's workers import this checkout's wmlab, as the driver here does
    src = str(Path(wmlab.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return Cluster(root, token, env)


@contextlib.contextmanager
def _stopped_after(made: Cluster) -> Iterator[None]:
    """Stop the cluster however its use ends, and fail if any of its processes remain."""
    try:
        yield
    finally:
        left = _stop(made.sessions)
        shutil.rmtree(made.root, ignore_errors=True)
    assert not left, f"processes of the test's Ray cluster still running: {left}"


def _start_head(made: Cluster, env: dict[str, str]) -> str:
    out = _ray_start(made, "head", "--head", f"--port={_free_port()}", "--num-cpus=1",
                     "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                     env=env)
    made.address = (made.root / "head" / "ray_current_cluster").read_text().strip()
    return out


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head with token authentication, as Ray 2.60 starts one where a token exists, and
    a second node on this machine (its own temp dir, 1 CPU each)."""
    made = _new_cluster()
    with _stopped_after(made):
        assert "Token authentication is enabled" in _start_head(made, made.env)
        # Ray 2.60 turns token mode on by itself for a head, not for a node that joins
        _ray_start(made, "worker", f"--address={made.address}", "--num-cpus=1",
                   env={**made.env, "RAY_AUTH_MODE": "token"})
        yield made


@pytest.fixture(scope="module")
def open_cluster() -> Iterator[Cluster]:
    """A head with token authentication off (RAY_AUTH_MODE=disabled), one node."""
    made = _new_cluster()
    with _stopped_after(made):
        _start_head(made, {**made.env, "RAY_AUTH_MODE": "disabled"})
        yield made


@pytest.fixture(autouse=True)
def client(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a user's shell on the head: the token in a file, no RAY_AUTH_MODE."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token))


def _train(root: Path, *flags: str) -> list[str]:
    return ["train-controller", "--preset", "doom", "--profile", "quick", "--run", "r",
            "--set", f"run.root={root}", "--set", "es.population=6", "--set", "es.rollouts=2",
            "--set", "es.job_members=1", "--set", "es.eval_rollouts=2", "--set",
            "es.timeout=120", "--set", "dream.max_steps=20", "--generations", "2",
            "--workers", "2", "--no-progress", *flags]


def _generations(root: Path) -> list[dict[str, str]]:
    """metrics.csv's rows without their wall-clock seconds."""
    with open(root / "r" / "controller" / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"}
                for row in csv.DictReader(handle)]


def _other_heads(ours: str, wait: float = 30.0) -> set[str]:
    """Ray clusters on this machine other than ours, given ``wait`` seconds to go: a local Ray
    instance that an earlier test shut down takes some seconds to stop."""
    deadline = time.monotonic() + wait
    while (others := local_heads() - {ours}) and time.monotonic() < deadline:
        time.sleep(1.0)
    return others


def test_address_and_auto_give_the_process_engines_generations(cluster, tmp_path, capsys):
    assert check_ray_address(cluster.address) == "token"  # what wmlab passes to Ray
    host_port = cluster.address.rsplit(":", 1)[1]
    assert check_ray_address(f"127.0.0.1:{host_port}") == "token"  # loopback reaches it too
    assert "RAY_AUTH_MODE" not in os.environ  # a check leaves the environment as it was
    others = _other_heads(cluster.address)
    runs = [("process", ["--engine", "process"]), ("address", ["--ray-address", cluster.address])]
    if not others:  # auto picks one of the running clusters: only ours must run
        runs.append(("auto", ["--ray-address", "auto"]))
    generations = {}
    for name, flags in runs:
        make_run(tmp_path / name)
        code = main(_train(tmp_path / name, *flags))
        assert code == 0, capsys.readouterr().err
        generations[name] = _generations(tmp_path / name)
    assert not ray.is_initialized()  # the engine disconnected when it closed
    process = generations.pop("process")
    assert len(process) == 2 and process[0]["best"] != process[0]["worst"]
    for name, rows in generations.items():
        assert rows == process, name
    if others:
        pytest.skip(f"auto not run: other Ray clusters run on this machine ({others})")


def test_jobs_land_on_both_nodes_and_results_stay_identical(cluster, tmp_path):
    cfg = make_run(tmp_path, overrides=("es.population=6", "es.rollouts=3",
                                        "dream.max_steps=30"))
    workload = workload_from_config(cfg, "dream")
    rng = np.random.default_rng(0)
    params = rng.normal(0, 0.5, (6, 40)).astype(np.float32)
    params[:2, :8] += 0.6  # some members survive a while, so returns differ
    seeds = rng.integers(0, 10_000, (6, 3))
    with Evaluator(workload, "serial", members_per_job=1) as ev:
        expected = ev.run(params, seeds)
    with Evaluator(workload, "ray", workers=2, timeout=120, members_per_job=1,
                   ray_address=cluster.address) as ev:
        got = ev.run(params, seeds)
        records = ev.job_records
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(expected)) > 1
    assert len(nodes) == 2  # the head and the node that joined it
    assert [r.job for r in records] == list(range(6))
    assert {r.node_id for r in records} == nodes  # one actor (1 CPU) on each node


def test_a_wrong_missing_or_switched_off_token_is_named(cluster, tmp_path, monkeypatch, capsys):
    pasted = tmp_path / "pasted_token"  # as `echo '<token>' > ~/.ray/auth_token` writes it
    pasted.write_text(cluster.token.read_text() + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(pasted))
    assert check_ray_address(cluster.address) == "token"
    other = tmp_path / "other_token"
    other.write_text(secrets.token_hex(32))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    started = time.monotonic()
    with pytest.raises(WmlabError, match=f"rejects the token in RAY_AUTH_TOKEN_PATH .{other}"):
        check_ray_address(cluster.address)
    assert time.monotonic() - started < 10  # not Ray's 20 s of retries
    make_run(tmp_path)
    assert main(_train(tmp_path, "--ray-address", cluster.address)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rejects the token" in err and "ray get-auth-token" in err
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(WmlabError, match="requires token authentication and this machine has "
                                         "no token: copy the head's token"):
        check_ray_address(cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(WmlabError, match="RAY_AUTH_TOKEN_PATH is .*cannot be read"):
        check_ray_address(cluster.address)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(WmlabError, match="requires token authentication but "
                                         "RAY_AUTH_MODE=disabled here: unset"):
        check_ray_address(cluster.address)


def test_another_ray_version_is_named(cluster, monkeypatch):
    on_the_cluster = ray.__version__
    monkeypatch.setattr(ray, "__version__", "2.0.0")  # as if this machine had another Ray
    with pytest.raises(WmlabError, match=rf"runs Ray {re.escape(on_the_cluster)} on Python "
                                         r".*, this machine Ray 2\.0\.0"):
        check_ray_address(cluster.address)


def test_a_wrong_address_names_the_one_the_head_advertises(cluster, monkeypatch):
    advertised = f"advertises {cluster.address}"
    with pytest.raises(WmlabError, match=f"does not answer .*{advertised}"):
        check_ray_address(f"127.0.0.1:{_free_port()}")
    with _http_server() as port, pytest.raises(WmlabError,
                                               match=f"not a Ray head .*{advertised}"):
        check_ray_address(f"127.0.0.1:{port}")
    # the head reached, but no node of it on this machine (as from a machine off the
    # cluster): Ray's scan of local raylets finds none
    from ray._private import services

    monkeypatch.setattr(services, "find_node_ids", lambda: [])
    with pytest.raises(WmlabError, match=f"runs no node of the Ray cluster .*{advertised}"):
        check_ray_address(cluster.address)


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    """A port that answers like a web server (a dashboard's, say), not like gRPC."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(10)


def test_a_cluster_without_authentication_is_sent_no_token(open_cluster, tmp_path,
                                                          monkeypatch):
    # this machine has a token (RAY_AUTH_TOKEN_PATH), the cluster takes none: a driver in
    # token mode would refuse its calls back
    assert check_ray_address(open_cluster.address) == "disabled"
    workload = workload_from_config(make_run(tmp_path, overrides=("dream.max_steps=30",)),
                                    "dream")
    rng = np.random.default_rng(1)
    params, seeds = rng.normal(0, 0.5, (3, 40)).astype(np.float32), rng.integers(0, 99, (3, 2))
    with Evaluator(workload, "serial", members_per_job=1) as ev:
        expected = ev.run(params, seeds)
    with Evaluator(workload, "ray", workers=1, timeout=120, members_per_job=1,
                   ray_address=open_cluster.address) as ev:
        np.testing.assert_array_equal(ev.run(params, seeds), expected)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(WmlabError, match="has token authentication off, but "
                                         "RAY_AUTH_MODE=token here"):
        check_ray_address(open_cluster.address)
