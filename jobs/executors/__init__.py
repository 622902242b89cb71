"""Executors: how a due retry gets to a scraper (the protocols: base.py; the outcomes: outcome.py;
the choice from the settings: wiring.py), one module each."""
