"""mailmoat's compact MTA and its command line."""
