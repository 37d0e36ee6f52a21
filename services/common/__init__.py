"""What every service shares: the server runtime, error mapping, config loading, auth."""
