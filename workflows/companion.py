"""A Keel worker's database companion: the process that claims and reports for it.

A forking worker must not carry a database connection into the work horses it forks
(on SQLite a connection may not cross a fork at all). Were the claim and the report made
in the worker itself, it would have to close its connection before each fork and open a
new one for every node: on SQLite a new connection reads the whole schema and compiles
every statement again, 3 to 5 ms of the 8 ms that Keel added to a node (bench/engine.py).
On either database, the worker's pages are shared with the horse after each fork, so
every page the claim and the report touch is faulted in again.

So the worker forks this companion once, while it holds no connection, and has it claim
and report over a socket pair (the simple worker too: its reports then cost it nothing
but the request). The companion keeps one warm connection and never forks;
the worker holds no connection when it forks a horse, and the horse opens its own only if
its node asks for one. Requests run one at a time, in order. An answer can be read later
than its request is sent: the claim is made while RQ does its bookkeeping in Redis.

If the companion dies, the request in flight fails with ``CompanionError`` (a
DatabaseError: the worker's usual handling follows, the horse claims for itself or the
watchdog finds the unreported attempt), and the next request starts a new companion. The
companion ignores SIGINT and SIGTERM, which reach the whole process group at Ctrl-C or a
service stop: it ends when the worker closes its side, after the worker's last report.
"""

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
from multiprocessing.connection import Connection

from django.db import DatabaseError, connections

from workflows import engine, executor, heartbeat

logger = logging.getLogger(__name__)

# What ``ps -o comm`` and psutil's name() show for the companion (at most 15 bytes).
PROCESS_NAME = "keel-companion"


class CompanionError(DatabaseError):
    """The companion could not do what was asked (a database error there, or it died)."""


class Companion:
    """The worker's side: starts the companion on first use and talks to it."""

    def __init__(self):
        self._pid: int | None = None
        self._channel: Connection | None = None
        self._sent = 0  # requests sent, numbered from 1
        self._answered = 0  # answers read (or given up on)

    # --- Requests -----------------------------------------------------------------------------

    def send_claim(self, node_run_id: int, attempt: int, *, worker: str, pid: int, host: str):
        """``engine.claim_attempt`` made by the companion; ``claim()`` on the result reads it."""
        number = self._send(
            {
                "op": "claim",
                "node_run_id": node_run_id,
                "attempt": attempt,
                "worker": worker,
                "pid": pid,
                "host": host,
            }
        )
        return SentClaim(self, number)

    def note_pid(self, node_run_id: int, attempt: int, pid: int) -> None:
        """Sent, not waited for (as ``report``)."""
        self._send({"op": "note_pid", "node_run_id": node_run_id, "attempt": attempt, "pid": pid})

    def report(
        self, claim: engine.Claim, *, actor: str, outcome: "executor.Outcome | None", job_id: str
    ) -> None:
        """``executor.report_ended_job``, made by the companion while the worker goes on to
        its next job. Not waited for: a failure there is logged there, and leaves the
        attempt running for the watchdog, as a worker that died would."""
        self._send(
            {
                "op": "report",
                "claim": claim.as_json(),
                "actor": actor,
                "outcome": outcome.as_json() if outcome is not None else None,
                "job_id": job_id,
            }
        )

    @property
    def busy(self) -> bool:
        """Whether something sent to the companion may not be done yet."""
        return self._answered < self._sent

    def settle(self) -> None:
        """Wait until the companion has done everything sent to it so far."""
        if self.busy:
            with contextlib.suppress(CompanionError):  # each failure was logged where it happened
                self._receive(self._sent)

    # --- The socket ---------------------------------------------------------------------------

    def _send(self, request: dict) -> int:
        message = json.dumps(request).encode()
        for _ in range(2):
            if not self._alive():
                self._start()
            try:
                self._channel.send_bytes(message)
            except OSError as error:  # it died since: nothing of this request was done
                self._forget(f"could not send to it ({error})")
                continue
            self._sent += 1
            return self._sent
        raise CompanionError("could not reach the database companion")

    def _receive(self, number: int):
        """The answer to request ``number``. Answers come in order: those to requests not
        waited for (reports, pid notes) are passed over on the way."""
        if self._channel is None or number <= self._answered:
            raise CompanionError("the database companion ended before answering")
        try:
            while self._answered < number:
                answer = json.loads(self._channel.recv_bytes())
                self._answered += 1
        except (EOFError, OSError) as error:
            self._forget(f"it ended while a request was in flight ({error!r})")
            raise CompanionError("the database companion ended before answering") from None
        if "error" in answer:
            raise CompanionError(f"the database companion failed: {answer['error']}")
        return answer.get("value")

    def _alive(self) -> bool:
        if self._pid is None:
            return False
        try:
            ended, _ = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            ended = self._pid
        if not ended:
            return True
        self._forget("it had ended", reaped=True)
        return False

    def _start(self) -> None:
        # No connection crosses the fork: this thread's are closed, and a simple worker's
        # heartbeat thread holds one only while it writes a beat.
        connections.close_all()
        ours, theirs = socket.socketpair()
        try:
            with heartbeat.between_beats():
                pid = os.fork()
        except OSError as error:
            ours.close()
            theirs.close()
            raise CompanionError(f"could not start the database companion: {error}") from error
        if pid == 0:  # the companion
            ours.close()
            _serve(Connection(theirs.detach()))  # never returns
        theirs.close()
        self._channel = Connection(ours.detach())
        self._pid = pid
        self._answered = self._sent
        logger.info("Database companion started (pid %s).", pid)

    def _forget(self, why: str, *, reaped: bool = False) -> None:
        logger.warning(
            "Database companion (pid %s): %s; the next request starts another.", self._pid, why
        )
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._pid is not None and not reaped:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
        self._pid = None
        self._answered = self._sent

    def close(self) -> None:
        """Let the companion finish what it was sent, end (it does once the worker's side
        of the socket is closed) and be reaped."""
        self.settle()
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._pid is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = None

    def abandon_in_child(self) -> None:
        """In a process forked from the worker (a work horse): drop the socket, without
        ending the companion, so that nothing there can ever write to it."""
        if self._channel is not None:
            self._channel.close()  # only this process's copy of the socket
            self._channel = None
        self._pid = None


class SentClaim:
    """A claim the companion is making; ``claim()`` waits for it."""

    def __init__(self, companion: Companion, number: int):
        self._companion = companion
        self._number = number
        self._claim: engine.Claim | bool | None = False  # False: not received yet

    def claim(self) -> engine.Claim | None:
        if self._claim is False:
            answer = self._companion._receive(self._number)
            self._claim = engine.Claim.from_json(answer) if answer is not None else None
        return self._claim


# --- The companion's side --------------------------------------------------------------------


def _serve(channel: Connection) -> None:
    """Answer the worker's requests until it closes its side; then exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name_process(PROCESS_NAME)
    status = 0
    try:
        while True:
            try:
                request = json.loads(channel.recv_bytes())
            except EOFError:
                break
            channel.send_bytes(json.dumps(_answer(request)).encode())
    except BaseException:
        logger.exception("Database companion stopped")
        status = 1
    finally:
        with contextlib.suppress(Exception):
            connections.close_all()
        os._exit(status)


def _answer(request: dict) -> dict:
    try:
        executor.check_connections()
        return {"value": _do(request)}
    except Exception as error:  # the worker hears of it, and logs it with its own handling
        logger.exception("Database companion: %s failed", request.get("op"))
        return {"error": f"{type(error).__name__}: {error}"}


def _do(request: dict):
    op = request["op"]
    if op == "claim":
        claim = engine.claim_attempt(
            request["node_run_id"],
            request["attempt"],
            worker=request["worker"],
            pid=request["pid"],
            host=request["host"],
        )
        return claim.as_json() if claim is not None else None
    if op == "note_pid":
        engine.record_attempt_pid(request["node_run_id"], request["attempt"], request["pid"])
        return None
    if op == "report":
        outcome = request["outcome"]
        executor.report_ended_job(
            engine.Claim.from_json(request["claim"]),
            actor=request["actor"],
            outcome=executor.Outcome.from_json(outcome) if outcome is not None else None,
            job_id=request["job_id"],
        )
        return None
    raise ValueError(f"unknown request {op!r}")


def _name_process(name: str) -> None:
    """Set the process's name as ps and top show it (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
