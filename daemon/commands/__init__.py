"""The `outboxd` subcommands, one module each. A module exposes
`register(subparsers, parents)`, which adds its parser and sets `func` to a
callable (args, settings) -> exit code."""
