"""Delivery: the process beside serve, the pass over the queue (retries, bounces), the agents
(SMTP relay with outbound TLS, Maildir) and the router that picks one per recipient."""
