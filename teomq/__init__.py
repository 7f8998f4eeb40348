"""teomq."""
