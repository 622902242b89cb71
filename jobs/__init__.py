"""The service layer: rules, sweeps, retries and the one recovery entry point."""
