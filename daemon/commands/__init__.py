"""The `outboxd` subcommands, one module each (the Kafka transport's in
consumers/commands.py). Each exposes a click command that daemon.cli finds by
name (COMMANDS) and imports only when it runs or its --help is asked; at module
level a command module imports click and daemon.commands.options, nothing more."""
