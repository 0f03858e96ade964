"""Accounting: the ledger that counts every request, its tokens and its end."""
