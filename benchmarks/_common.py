"""Shared helpers for the performance benchmarks."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from failover import ChannelRequest, ChannelResult

OUT = Path(os.environ.get("FAILOVER_BENCH_OUT", Path(__file__).parent / "results"))


class InstantChannel:
    """Answers at once: measures the library, not a provider."""

    name = "instant"
    idempotent = True

    async def submit(self, request: ChannelRequest) -> ChannelResult:
        return ChannelResult.succeeded(request.reference)

    async def query(self, request: ChannelRequest) -> ChannelResult:
        return ChannelResult.not_found()


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write(name: str, figures: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **figures}, indent=2))
    return path
