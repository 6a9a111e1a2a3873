"""The auth milter: SPF, DKIM, ARC and DMARC, one Authentication-Results header."""
