"""``qcompiler plan-schema``: print (or write) the JSON Schema of plan files, for editor completion.

The schema is generated from the declarations the plan parser checks against
(:mod:`qcompiler.plan.json_schema`); ``docs/plan.schema.json`` is its committed copy.
"""

from __future__ import annotations

from pathlib import Path

import click

from qcompiler import ir
from qcompiler.plan.json_schema import plan_json_schema_text


def register(cli: click.Group) -> None:
    @cli.command("plan-schema")
    @click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
                  help="Write the schema to this file (default: print it).")
    def plan_schema_cmd(output: Path | None) -> None:
        """Print the JSON Schema of plan files (YAML / JSON), for editor completion: point
        yaml-language-server at it with a first line '# yaml-language-server: $schema=plan.schema.json'."""
        text = plan_json_schema_text()
        if output is None:
            click.echo(text, nl=False)
            return
        with ir.OutputSet() as outs:  # checked (a folder in the way, an unwritable place), written atomically
            outs.add_output(output, "-o", primary=True)
            outs.path(output).write_text(text, encoding="utf-8")
            outs.commit()
        click.echo(f"wrote {output}", err=True)
