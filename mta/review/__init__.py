"""Outbound review in serve: resuming held mail and the runner of timers and decisions."""
