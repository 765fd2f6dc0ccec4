"""Run `turnid serve` as a subprocess and learn its address from its start-up log line."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading

_READY = re.compile(r"turnid serving on (\S+)")


def serve_command(*args: str) -> list[str]:
    """`turnid serve ARGS` with this interpreter."""
    return [sys.executable, "-m", "turnid.service.cli", "serve", *args]


class ServeProcess:
    def __init__(self, database: str, *extra: str, listen: str = "127.0.0.1:0") -> None:
        command = serve_command("--listen", listen, "--database", database, *extra)
        # No drain unless the test (or its environment) asks: tests stop servers by the dozen.
        env = {"TURNID_DRAIN": "0", **os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.log: list[str] = []
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:  # keeps the pipe from filling up for the life of the process
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                self.kill()
                raise TimeoutError("turnid serve did not report ready in 30 s") from None
            if line is None:
                raise RuntimeError(f"turnid serve exited: {''.join(self.log)}")
            if match := _READY.search(line):
                self.target = match.group(1)
                return

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
