"""The durable on-disk queue (the spool), its format number, and the admin's view of it."""
