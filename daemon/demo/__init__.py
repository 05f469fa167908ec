"""`outboxd demo`: the narrative a user reads (narrative.py) and the embedded
stores it runs on (embedded.py); the click command is daemon/commands/demo.py."""
