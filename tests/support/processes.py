"""Running the real ``runflow-receiver serve`` as a subprocess on 127.0.0.1, for process tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def receiver_env(**values: str) -> dict[str, str]:
    """The environment for a receiver subprocess: ours minus RECEIVER_*, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    if os.environ.get("RECEIVER_DB_PGBOUNCER"):
        # The test server is a PgBouncer (.ci/pgbouncer): every receiver behind it needs this.
        env["RECEIVER_DB_PGBOUNCER"] = os.environ["RECEIVER_DB_PGBOUNCER"]
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.update(values)
    return env


def run_cli(*args: str, env: dict[str, str], cwd: Path, seconds: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=seconds,
        check=False,
    )
    assert done.returncode == 0, f"{args} failed: {done.stdout}\n{done.stderr}"
    return done.stdout


@contextmanager
def serving(
    env: dict[str, str], cwd: Path, *, workers: int = 2, ready_seconds: float = 60
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``serve`` on a free port until the block ends; yields its base URL and the process."""
    port = free_port()
    log = open(cwd / f"serve-{port}.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "receiver", "serve", "--port", str(port), "--workers", str(workers)],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_seconds
        while True:
            if process.poll() is not None:
                raise AssertionError(f"serve exited: {(cwd / log.name).read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve not ready: {Path(log.name).read_text()}")
            time.sleep(0.2)
        yield base, process
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM) -> None:
    """Stop the whole process group and wait; SIGKILL if it takes more than 20 s."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def serve_in_thread(app: Any, **config: Any) -> Iterator[int]:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port in a thread; yields the port.

    ``config`` goes to ``uvicorn.Config`` (e.g. ``ssl_certfile``/``ssl_keyfile`` for TLS).
    """
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def embedded_url(data_dir: Path) -> str:
    """The embedded server's URL, read from its postmaster.pid (socket directory)."""
    lines = (data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()
    port, socket_dir = lines[3].strip(), lines[4].strip()
    return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


def postmaster_pid(data_dir: Path) -> int:
    return int((data_dir / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def postgres_processes(data_dir: Path) -> list[Any]:
    """The embedded postmaster under ``data_dir`` and its children (psutil processes)."""
    import psutil

    master = psutil.Process(postmaster_pid(data_dir))
    return [master, *master.children(recursive=True)]


def worker_processes(process: subprocess.Popen[bytes]) -> list[Any]:
    """uvicorn's worker processes under ``serve`` (multiprocessing children, not its helpers)."""
    import psutil

    found = []
    for child in psutil.Process(process.pid).children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "spawn_main" in cmdline:
            found.append(child)
    return found


def wait_for(predicate: Any, *, seconds: float, step: float = 0.2) -> bool:
    """Poll ``predicate`` until it is true or ``seconds`` pass (an OSError counts as false)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if predicate():
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def embedded_postgres_running(data_dir: Path) -> list[int]:
    """Pids of live ``postgres`` processes serving a data directory under ``data_dir``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if proc.info["name"] != "postgres" or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(str(data_dir) in part for part in proc.info["cmdline"] or []):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found
