"""The ``silotune`` command line, above the flows and the operations package.

One module per command group: ``cli.run`` (run a federation, the demo), ``cli.reports`` (ledgers,
registries, audits, planning), ``cli.keys``, ``cli.stack`` (and ``worker``), ``cli.silo``; shared
helpers in ``cli.common``. This module assembles ``app`` in the order ``silotune --help`` lists it.

Importing the library's config, flows or Prefect takes seconds (torch, transformers), so the commands
import those when they run: ``silotune --help`` starts in well under a second.
"""

from __future__ import annotations

import typer

from cli import keys, reports, run, silo, stack
from cli.common import offline

app = typer.Typer(
    callback=offline,
    add_completion=False,
    no_args_is_help=True,
    help="Federated post-training of open-source language models across data silos.",
)

for _name, _command in (
    ("run", run.run),
    ("config-json", run.config_json),
    ("make-demo-data", run.make_demo_data),
    ("summary", run.summary),
    ("export", run.export),
    ("personalize", run.personalize),
    ("ledger", reports.ledger),
    ("aggregators", reports.aggregators),
    ("demo", run.demo),
    ("audit", reports.audit),
    ("compare", reports.compare),
    ("eval", reports.eval_cmd),
    ("robustness-grid", reports.robustness_grid_cmd),
    ("methods", reports.methods),
    ("models", reports.models),
    ("estimate", reports.estimate),
    ("plan", reports.plan),
    ("worker", stack.worker),
):
    app.command(_name)(_command)
app.add_typer(keys.keys_app, name="keys")
app.add_typer(stack.stack_app, name="stack")
app.add_typer(stack.ca_app, name="ca")
app.add_typer(silo.silo_app, name="silo")
app.add_typer(reports.report_app, name="report")


def main() -> None:  # pragma: no cover
    app()
