"""Run `turnid serve` as a subprocess and learn its address from its start-up log line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

_READY = re.compile(r"turnid serving on (\S+)")


def serve_command(*args: str) -> list[str]:
    """`turnid serve ARGS` with this interpreter."""
    return [sys.executable, "-m", "turnid.service.cli", "serve", *args]


class ServeProcess:
    """`turnid serve --listen LISTEN --database DATABASE FLAGS...`, ready once it logs that it
    serves. `--drain` is 0 unless the flags or the environment (TURNID_DRAIN) say otherwise:
    tests stop servers by the dozen and have no load balancer to wait for."""

    def __init__(
        self,
        database: str,
        *extra: str,
        listen: str = "127.0.0.1:0",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        command = serve_command("--listen", listen, "--database", database, *extra)
        environment = {"TURNID_DRAIN": "0", **os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment
        )
        self.log: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        threading.Thread(target=self._drain, daemon=True).start()
        if not wait:
            return
        try:
            line = self.wait_for_log(_READY, timeout=30)
        except TimeoutError:
            self.kill()
            raise TimeoutError("turnid serve did not report ready in 30 s") from None
        except EOFError:
            raise RuntimeError(f"turnid serve exited: {''.join(self.log)}") from None
        match = _READY.search(line)
        assert match is not None
        self.target = match.group(1)

    def _drain(self) -> None:  # keeps the pipe from filling up for the life of the process
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.log.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for_log(
        self, pattern: str | re.Pattern[str], *, timeout: float = 30, count: int = 1
    ) -> str:
        """The `count`-th log line that matches `pattern` (re.search), once it is there.

        TimeoutError if it does not come in time, EOFError if the process's stderr ends first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.log if regex.search(line)]
                if len(found) >= count:
                    return found[count - 1]
                if self._ended:
                    raise EOFError(f"turnid serve ended before {regex.pattern!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no log line {regex.pattern!r} in {timeout} s")
                self._changed.wait(remaining)

    def wait_for_end_of_log(self, timeout: float = 30) -> None:
        """Until stderr is closed: the process and every child that shares its stderr are gone."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"turnid serve's stderr still open after {timeout} s")
                self._changed.wait(remaining)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.process.kill()
        self.process.wait(30)

    def terminate(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Ask for a graceful stop; returns the exit code."""
        self.process.send_signal(signum)
        return self.process.wait(30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.kill()
