"""How settings are named, read, checked and reported, apart from the settings
classes themselves (daemon.config.Settings and the tables it holds).

Names. A setting is OUTBOXD_<NAME>, or OUTBOXD_<TABLE>__<NAME> inside a table
([qdrant], [embedding], [health], [verify], a wing's such as [kafka]); a few
also have a conventional name (DATABASE_URL, QDRANT_URL, KAFKA_BOOTSTRAP_SERVERS).
A setting that moved into a table keeps its old flat name (OUTBOXD_KAFKA_TOPIC,
`kafka_topic` in the config file) as a deprecated one: read, with a warning
naming the new one (a settings class's `renamed`).

One module per job:
  names    the registry: every setting of a class and every name it answers to
  sources  where values come from besides pydantic-settings' own sources: a
           secret's *_FILE, the names pydantic's environment source does not
           read, the TOML config file, .env
  check    the names no setting answers to (a typo) and the deprecated ones
  report   a bad value, named where the operator set it
"""
