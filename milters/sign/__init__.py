"""The sign milter: DKIM-signs outbound mail and ARC-seals inbound mail we changed, last in
the chain, over the bytes as they leave (DESIGN section 2)."""
