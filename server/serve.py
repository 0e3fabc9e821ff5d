"""The HTTP server process that `mxisd run` starts: Sanic, in one process or with its workers.

It runs in a process group of its own, so that `mxisd run` can stop all of it (Sanic's worker
manager, its workers and its state-sharing process) with one signal when Sanic itself does not
stop: Sanic loses a stop signal that comes while its workers are still starting."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from typing import Any

from sanic import Sanic
from sanic.worker.constants import ProcessState
from sanic.worker.loader import AppLoader
from sanic.worker.manager import WorkerManager

from indexer import logs
from indexer.config import read_config
from indexer.redis_clients import RedisTarget, configured_target
from indexer.settings import Config
from server.app import App, create_app

log = logging.getLogger(__name__)

# How long the server may take to stop by itself once `mxisd run` has gone away.
ORPHAN_GRACE = 10.0
# How long a reload waits for the workers' start, or their replacement on the reload before, to be
# over (Sanic gives a worker 30 s to start).
REPLACE_WAIT = 60.0


def _create_app(current: list[Config], target: RedisTarget) -> App:
    return create_app(current[0], target)


def serve(config: Config, target: RedisTarget, listening: int | None = None) -> None:
    """Serve until stopped; write a byte to the file descriptor listening once the port is bound."""
    server = config.server
    # The latest config, in a list that a reload changes: workers started later are made with it.
    current = [config]
    loader = AppLoader(factory=partial(_create_app, current, target))
    app = loader.load()

    # Set once the server can take a reload: its app made (one process), or Sanic's worker manager
    # there to be told (workers).
    ready = threading.Event()

    async def tell(*_: Any) -> None:
        ready.set()
        if listening is not None:
            os.write(listening, b"1")
            os.close(listening)

    app.prepare(
        host=server.bind,
        port=server.port,
        workers=server.workers,
        access_log=False,  # the app logs each request itself, with secrets masked
        motd=False,
        single_process=server.workers == 1,
    )
    log.info("serving %s on http://%s:%d", server.name, server.bind, server.port)
    threading.Thread(target=_follow_config, args=(app, current, server.workers == 1, ready), name="config",
                     daemon=True).start()
    if server.workers == 1:
        app.after_server_start(tell)
        Sanic.serve_single(primary=app)
    else:
        # Sanic's main process binds the port before its workers start, and before this event.
        app.main_process_ready(tell)
        app.main_process_ready(_stop_at_once_while_starting)
        Sanic.serve(primary=app, app_loader=loader)


async def _stop_at_once_while_starting(app: App, _: Any) -> None:
    """Sanic's worker manager loses a stop signal that comes before every worker has said it is
    ready (it waits for them forever, at full speed): until then, a stop signal kills this process
    group at once. Nothing has been served yet, so nothing is cut short."""
    manager = app.manager
    sanic_handlers: dict[int, Any] = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    seen: list[bool] = []  # once every worker was ready, a worker restarting later is no start-up

    def started() -> bool:
        if not seen:
            servers = [s for s in manager.worker_state.values() if s.get("server")]
            if len(servers) == manager.num_server and all(s.get("state") == "ACKED" for s in servers):
                seen.append(True)
        return bool(seen)

    def handler(signum: int, frame: Any) -> None:
        try:
            ready = started()
        except (OSError, EOFError):  # Sanic's state process is gone already
            ready = False
        if not ready:
            os.killpg(0, signal.SIGKILL)
        sanic = sanic_handlers[signum]
        if callable(sanic):
            sanic(signum, frame)

    for signum in sanic_handlers:
        signal.signal(signum, handler)


def _follow_config(app: App, current: list[Config], single: bool, ready: threading.Event) -> None:
    """Apply each config `mxisd run` re-reads on SIGHUP (sent on stdin; it differs from the one
    before only in what a reload applies): log_level, the rate limits and sessions.policy. One process applies them
    in place; workers are replaced by new ones started with them, each new one before its old one
    stops, so that nothing stops answering. A config that comes while the server is starting is
    applied once it has started (`systemctl reload` right after `systemctl start`)."""
    replacements = 0
    while (new := read_config(sys.stdin.fileno())) is not None:
        current[0] = new
        logging.getLogger().setLevel(new.log_level)
        # Not bounded: the server starts, or this process ends (this thread is a daemon). Workers
        # that Sanic starts meanwhile are made with current[0], and replacing them again is harmless.
        ready.wait()
        if single:
            app.ctx.services.reload(new)
            log.info("log_level and rate limits re-read")
        else:
            _replace_workers(app.manager, replacements)
            replacements += 1
            log.info("log_level and rate limits re-read; the workers are replaced by new ones")


def _replace_workers(manager: WorkerManager, before: int) -> None:
    """Have Sanic replace every worker, new ones first (as its auto-reload does; they are made by the
    app loader, which holds the latest config), once the `before` replacements asked earlier are
    over: Sanic's replacement is not reentrant (a second one that comes before the first has
    stopped the old process loses track of it, and stops a new one instead)."""
    deadline = time.monotonic() + REPLACE_WAIT
    while not all(p.state is ProcessState.ACKED and p.worker_state[p.name].get("starts", 0) > before
                  and not hasattr(p, "_old_process") for p in manager.transient_processes):
        if time.monotonic() > deadline:
            log.warning("the workers were not all started and ready within %g s; replacing them anyway",
                        REPLACE_WAIT)
            break
        time.sleep(0.1)
    manager.monitor_publisher.send("__ALL_PROCESSES__::STARTUP_FIRST")


def _watch_parent(parent_pid: int) -> None:
    """Stop this server when `mxisd run` is gone (killed, so it could not stop us itself)."""
    stop = threading.Event()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            log.warning("mxisd run is gone; the HTTP server stops")
            os.kill(os.getpid(), signal.SIGTERM)
            if not stop.wait(ORPHAN_GRACE):
                os.killpg(0, signal.SIGKILL)


def main() -> None:
    """`python -m server.serve EMBEDDED_URL PARENT_PID [LISTENING_FD]` with the config on stdin
    (read_config); EMBEDDED_URL is used when the config names no Redis."""
    embedded_url, parent_pid = sys.argv[1], int(sys.argv[2])
    listening = int(sys.argv[3]) if len(sys.argv) > 3 else None
    config = read_config(sys.stdin.fileno())
    if config is None:
        raise SystemExit("server: no config on stdin")
    logs.setup(config.log_level, "server", config.log_format)
    # A hangup of the terminal reaches `mxisd run` alone, which decides what it means.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    serve(config, configured_target(config.redis) or embedded_url, listening)


if __name__ == "__main__":
    main()
