"""The review milter: holds outbound mail for a delay, the sender's confirmation or an approval (issue 18)."""
