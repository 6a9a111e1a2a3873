"""SpamGuard-style flow limiting per client IP, sender and SMTP AUTH user, with spam points."""
