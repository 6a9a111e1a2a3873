"""Event-loop plumbing shared by SMTP in and the milter chain: the loop itself, socket reads
into a shared buffer, and sessions resumed from their connection's callbacks."""
