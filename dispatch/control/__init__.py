"""Control: the HTTP API and its client, and what the broker itself answers."""
