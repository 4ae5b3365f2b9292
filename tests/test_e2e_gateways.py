"""End to end over real sockets: two ``failover gateway-sim`` servers behind two
instances of the FastAPI example service on one PostgreSQL journal, under load, with
both instances SIGKILLed mid-load and restarted, audited against the gateways' ledgers.

The driver is ``examples/e2e.py`` (``python examples/e2e.py --journal URL`` runs it by
hand, larger if asked); ``examples/gateways.toml`` is the service's configuration.
Marked ``slow`` (about 20 s here: a killed instance's repayments wait out its lease, 10 s
in this run, and what is left pending waits for a live instance's reconcile, every 5 s),
so it runs in ``.ci/run``'s last step, not in the README's test command.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("fastapi", reason="the example service needs failover[service]")
pytest.importorskip("uvicorn", reason="the service and the gateways run under uvicorn")
pytest.importorskip("asyncpg", reason="the instances share a PostgreSQL journal")

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    """An example file as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


e2e = load("e2e")


@pytest.mark.slow
async def test_two_gateways_two_instances_killed_mid_load_collect_each_key_once(
        postgres_dsn: str, pg_schema: str, tmp_path: Path):
    """300 repayments (a fifth of the keys sent twice at once, to both instances), both
    instances SIGKILLed mid-load and restarted, every unanswered request sent again:
    every copy answered, copies of a key alike, nothing pending once the background
    loops have settled, and the gateways' ledgers hold every SUCCEEDED key collected
    exactly once net of refunds and every FAILED key not at all."""
    params = e2e.Params(repayments=300, repeat_share=0.2, concurrency=16, kills=2, seed=1)
    started = time.monotonic()
    report = await e2e.run(params, postgres_dsn, pg_schema, tmp_path)
    figures = report.figures() + f"\nwall         {time.monotonic() - started:.1f} s"
    print(figures)

    assert report.audit is not None, figures
    assert [] == report.problems, figures
    assert 360 == len(report.answers), figures  # every copy of every key answered
    assert 0 == report.audit.pending, figures
    assert (0, 0) == (len(report.audit.duplicates), len(report.audit.lost)), figures
    assert report.audit.ok, figures
    assert 300 == report.audit.succeeded + report.audit.failed, figures
    assert 0 == report.pending_late, figures
    assert 0 == report.refunds_open, figures
    # The run was what it claims, or it proves little: both instances killed with
    # requests in the air, and the gateways injected each kind of fault.
    assert ["a", "b"] == [k.instance for k in report.kills], figures
    assert all(k.in_flight > 0 for k in report.kills), figures
    assert report.retried_keys() > 0, figures
    card = report.injected["bank_card"]
    assert card["payment reset"] > 0, figures
    assert card["payment late"] > 0, figures
    five_xx = sum(counts[status] for counts in report.injected.values()
                  for status in ("500", "502", "503"))
    assert five_xx > 0, figures
