"""SaMMA's harmless mode: mail from suspicious senders made inert (links, HTML, attachments)."""
