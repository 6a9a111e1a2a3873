"""Store key names that a reader outside their milter needs (the console's overview lists
the ratelimit's top sources; mta may not import milters.ratelimit)."""
from __future__ import annotations

RATELIMIT_IP_PREFIX = "rl:ip:"  # + "[address]:" + what: "points" or "bucket:NAME"
RATELIMIT_POINTS = "points"
