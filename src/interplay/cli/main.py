"""The ``interplay`` command: one typer app, commands grouped by module."""

from __future__ import annotations

import typer

from . import dashboard, db, demo, inspect, map, run, workflows

__all__ = ["cli", "main"]

cli = typer.Typer(
    name="interplay",
    help="Microservices by choreography and orchestration: run, publish, trace, replay.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
demo.register(cli)
run.register(cli)
inspect.register(cli)
workflows.register(cli)
db.register(cli)
dashboard.register(cli)
map.register(cli)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
