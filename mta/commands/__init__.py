"""Commands beside serve that do one job and exit: scan, dkim keygen/check, init."""
