"""``entroclip theory ...`` subcommands."""

import typer

app = typer.Typer(help="Tabular softmax theory lab: expected entropy drift under clipping.", no_args_is_help=True)
