"""`outboxd completion SHELL`: the shell completion script, from click's own."""
from __future__ import annotations

import click


@click.command(help="Print the completion script for SHELL. Install it with, for bash: "
               "`outboxd completion bash > ~/.local/share/bash-completion/completions/outboxd`; zsh: "
               "`outboxd completion zsh > \"${fpath[1]}/_outboxd\"`; fish: "
               "`outboxd completion fish > ~/.config/fish/completions/outboxd.fish`.")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def command(shell: str) -> int:
    from click.shell_completion import get_completion_class

    from daemon.cli import cli

    complete = get_completion_class(shell)(cli, {}, "outboxd", "_OUTBOXD_COMPLETE")
    click.echo(complete.source())
    return 0
