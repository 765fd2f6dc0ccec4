"""Shared helpers of the ops tests: scrape /metrics, run the admin commands in-process."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from turnid.service.admin import add_admin_commands, run_admin_command


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


async def scrape(port: int) -> list[Sample]:
    """Every sample of http://127.0.0.1:PORT/metrics, parsed as Prometheus does."""
    text = await asyncio.to_thread(scrape_text, port)
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def admin(*argv: str) -> tuple[int, str, str]:
    """`turnid ARGV` for the admin commands, in-process: (exit status, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="turnid")
    add_admin_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = run_admin_command(args)
    return status, out.getvalue(), err.getvalue()
