"""SMTP in: the gateway's SMTP server, from the first line a client sends to the queue's 250."""
