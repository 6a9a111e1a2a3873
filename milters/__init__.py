"""mailmoat milters: each one a standalone pymilter daemon over the shared core."""
