"""The server's per-round pieces, each chosen once from the config: who takes part
(``participation``), how updates combine into what is released (``release``)."""
