"""The attachments milter: SaMMA-style PPAP countermeasure (encrypt, offload, delete)."""
