"""The running gateway (`mailmoat serve`): the supervisor, the SMTP listener, privileges and
health (the metrics every stage counts into are mta/metrics.py; serve exposes them)."""
