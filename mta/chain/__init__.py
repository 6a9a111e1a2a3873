"""The milter chain: the milter protocol client (blocking and on the event loop), the pool of
open milter connections, one chain session per SMTP session, and the edits it applies."""
