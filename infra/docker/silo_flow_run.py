"""Run one silo flow run inside a Kubernetes Job of a silo's pool, with the code of this image only.

The Kubernetes worker starts each run as ``python /opt/silotune/infra/docker/silo_flow_run.py`` with
``$PREFECT__FLOW_RUN_ID`` set. Prefect's own engine (``prefect flow-run execute``) would first run the
deployment's pull steps and import its entrypoint: both are whatever the Prefect API says, and the
API (or anyone holding its auth string) may be hostile to this silo. Here the deployment is never
read: the run's flow name picks one of the silo flows built into the image (``silo-round``,
``silo-evaluate``, ``silo-step``), and anything else is refused before any silo code runs. The silo
flow then checks the run's config against the silo's policy (``$SILOTUNE_SILO_POLICY``), as every
silo worker does.
"""

from __future__ import annotations

import os
import sys
from typing import Any
from uuid import UUID

# The flows a silo's Job may run, by Prefect flow name (flows/silo.py).
SILO_FLOWS = ("silo-round", "silo-evaluate", "silo-step")


class RefusedRun(Exception):
    """The flow run asks for something this silo's Job does not run."""


def silo_flow(name: str) -> Any:
    """The silo flow named ``name``; :class:`RefusedRun` for any other name (nothing imported then)."""
    if name not in SILO_FLOWS:
        raise RefusedRun(f"flow {name!r} is not a silo flow (a silo's Job runs only {', '.join(SILO_FLOWS)})")
    # imports torch and transformers (seconds): only once the run is known to be a silo flow
    from flows.silo import silo_evaluate, silo_round, silo_step

    return {f.name: f for f in (silo_round, silo_evaluate, silo_step)}[name]


def main() -> int:
    # Prefect's client and engine, imported here: the refusal above needs neither.
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    raw = os.environ.get("PREFECT__FLOW_RUN_ID", "")
    try:
        run_id = UUID(raw)
    except ValueError:
        print(f"silo_flow_run: PREFECT__FLOW_RUN_ID is not a flow run id: {raw!r}", file=sys.stderr)
        return 2
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run_id)
        name = client.read_flow(flow_run.flow_id).name
    try:
        flow = silo_flow(name)
    except RefusedRun as exc:
        print(f"silo_flow_run: flow run {run_id}: {exc}", file=sys.stderr)
        return 2
    # The run's own state (completed, failed) goes to the API; exit 0 says the engine ran it.
    run_flow(flow, flow_run=flow_run, return_type="state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
