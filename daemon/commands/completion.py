"""`outboxd completion SHELL`: the shell completion script, from click's own."""
from __future__ import annotations

import click
from click.shell_completion import get_completion_class


@click.command(help="Print the completion script for SHELL. Install it with, for bash: "
               "`outboxd completion bash > ~/.local/share/bash-completion/completions/outboxd`; zsh: "
               "`outboxd completion zsh > \"${fpath[1]}/_outboxd\"`; fish: "
               "`outboxd completion fish > ~/.config/fish/completions/outboxd.fish`.")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def command(ctx: click.Context, shell: str) -> int:
    # the root group is this command's caller (daemon.cli, which finds this module by name)
    complete = get_completion_class(shell)(ctx.find_root().command, {}, "outboxd", "_OUTBOXD_COMPLETE")
    click.echo(complete.source())
    return 0
