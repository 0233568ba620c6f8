"""Worker pool for the symbolic check: fresh interpreters over pipes (see the package docstring)."""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import astuple
from typing import Optional, Sequence

from .compare import _compare, _SympyComparer
from .config import DEFAULT_CONFIG, RewardConfig

# The child registers this package's folder under a private name without running any __init__
# (neither this package's nor the ``trainer`` package's, which may grow heavy), so importing its
# ``pool`` module loads only the verifier's own modules, found through the __path__ set here.
_WORKER_BOOT = (
    "import importlib,importlib.util,os,sys\n"
    "d=sys.argv[1]\n"
    "s=importlib.util.spec_from_file_location('_psnrl_reward_worker',os.path.join(d,'__init__.py'),"
    "submodule_search_locations=[d])\n"
    "sys.modules[s.name]=importlib.util.module_from_spec(s)\n"
    "importlib.import_module(s.name+'.pool')._worker_main()\n"
)
_GRACE_S = 0.5          # after a job's limit, how long a worker may take to interrupt itself
_STARTUP_S = 60.0       # how long a fresh worker may take to import sympy


class _WorkerTimeout(BaseException):
    """Raised by SIGALRM inside the worker; BaseException so ``except Exception`` misses it."""


def _worker_main():  # pragma: no cover - runs in the child interpreter
    import signal

    try:
        import resource

        lim = 4 << 30
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except Exception:
        pass
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)   # stray prints from libraries cannot corrupt the protocol
    inp = sys.stdin.buffer
    import sympy  # noqa: F401
    from sympy.core.cache import clear_cache

    def on_alarm(signum, frame):
        raise _WorkerTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    out.write(b"R\n")
    done = 0
    while True:
        hdr = inp.read(4)
        if len(hdr) < 4:
            return
        (n,) = struct.unpack("<I", hdr)
        data = inp.read(n)
        answer = b"0"
        try:
            try:
                job = pickle.loads(data)
                signal.setitimer(signal.ITIMER_REAL, max(0.01, float(job[0])))
                if job[1] == "sleep":   # test hook: a job that overruns its limit
                    if job[3]:          # ... and cannot be interrupted (as if stuck in C code)
                        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                    time.sleep(float(job[2]))
                    answer = b"1"
                else:
                    p, r, ppct, rpct, fields = job[1:]
                    cfg = RewardConfig(*fields)
                    res = _compare(p, r, ppct, rpct, _SympyComparer(cfg))
                    answer = b"1" if res is True else b"0"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _WorkerTimeout:
            answer = b"T"
            clear_cache()
        except BaseException:
            answer = b"0"
        out.write(answer + b"\n")
        done += 1
        if done % 2000 == 0:
            clear_cache()


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.dirname(os.path.abspath(__file__))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the terminal reaches the trainer (which stops at the next
            # iteration boundary), not the workers still scoring this iteration. A worker whose
            # parent dies sees its stdin close and exits.
            close_fds=True, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.state = "starting"
        self.wake = time.monotonic() + _STARTUP_S
        self.job = None

    def send(self, payload: bytes):
        self.proc.stdin.write(struct.pack("<I", len(payload)) + payload)
        self.proc.stdin.flush()

    def read_lines(self):
        """Complete lines available now; None at EOF."""
        data = os.read(self.fd, 4096)
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self):
        try:
            self.proc.kill()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass
        self.state = "dead"


class _Pool:
    def __init__(self):
        self.lock = threading.Lock()
        self.workers = []
        self.pid = os.getpid()
        self.disabled_until = 0.0

    def _fresh(self):
        if os.getpid() != self.pid:   # forked: the pipes belong to the parent's workers
            self.workers = []
            self.pid = os.getpid()
        self.workers = [w for w in self.workers if w.state != "dead"]

    def _spawn(self) -> Optional[_Worker]:
        if time.monotonic() < self.disabled_until or not sys.executable:
            return None
        try:
            return _Worker()
        except Exception:
            self.disabled_until = time.monotonic() + 60.0
            return None

    def start(self, n: int):
        with self.lock:
            self._fresh()
            while len(self.workers) < n:
                w = self._spawn()
                if w is None:
                    break
                self.workers.append(w)

    def close(self):
        with self.lock:
            if os.getpid() == self.pid:
                for w in self.workers:
                    w.kill()
            self.workers = []

    def run(self, payloads: Sequence[bytes], timeout_s: float, n_workers: int) -> list:
        """One bool per payload; False for timeouts, crashes, or no worker."""
        import select

        results = [False] * len(payloads)
        if not payloads:
            return results
        with self.lock:
            self._fresh()
            want = max(1, min(n_workers, len(payloads)))
            while len(self.workers) < want:
                w = self._spawn()
                if w is None:
                    break
                self.workers.append(w)
            pending = deque(range(len(payloads)))
            respawns = 0
            while True:
                now = time.monotonic()
                for w in self.workers:
                    if w.state == "idle" and pending:
                        j = pending.popleft()
                        try:
                            w.send(payloads[j])
                        except Exception:   # died since the last look: retry on another
                            w.kill()
                            pending.appendleft(j)
                            continue
                        w.state, w.job, w.wake = "busy", j, now + timeout_s
                live = [w for w in self.workers if w.state in ("starting", "busy", "grace")]
                if not live or (not pending and not any(w.state == "busy" for w in live)):
                    break
                delay = max(0.0, min(w.wake for w in live) - now)
                try:
                    ready, _, _ = select.select([w.fd for w in live], [], [], delay)
                except (OSError, ValueError):
                    for w in live:
                        w.kill()
                    break
                for w in live:
                    if w.fd not in ready:
                        continue
                    try:
                        lines = w.read_lines()
                    except OSError:
                        lines = None
                    if lines is None:   # the worker died (e.g. out of memory): the job scores 0
                        w.kill()
                        continue
                    for line in lines:
                        if w.state == "starting" and line == b"R":
                            w.state = "idle"
                        elif w.state == "busy":
                            results[w.job] = line == b"1"
                            w.state = "idle"
                        elif w.state == "grace":
                            w.state = "idle"
                now = time.monotonic()
                for w in live:
                    if w.state == "busy" and now >= w.wake:
                        w.state, w.wake = "grace", now + _GRACE_S   # the job scores 0
                    elif w.state in ("grace", "starting") and now >= w.wake:
                        w.kill()
                self.workers = [w for w in self.workers if w.state != "dead"]
                while len(self.workers) < want and pending and respawns < 4 * want + 8:
                    w = self._spawn()
                    if w is None:
                        break
                    respawns += 1
                    self.workers.append(w)
            return results


_POOL = _Pool()
atexit.register(_POOL.close)


def warmup(config: Optional[RewardConfig] = None) -> None:
    """Start the symbolic worker processes now (they import sympy, ~1 s) instead of lazily."""
    cfg = config or DEFAULT_CONFIG
    if cfg.symbolic:
        _POOL.start(cfg.n_workers)


def shutdown_workers() -> None:
    """Stop the symbolic workers (they are restarted on demand; also runs at exit)."""
    _POOL.close()


def _run_jobs(jobs: list, cfg: RewardConfig, timeout_s: float) -> list:
    fields = astuple(cfg)   # plain values: the worker does not import the trainer package
    payloads = [pickle.dumps((timeout_s,) + tuple(job) + (fields,), protocol=4) for job in jobs]
    return _POOL.run(payloads, timeout_s, cfg.n_workers)
