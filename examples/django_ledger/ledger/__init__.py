"""The ledger app: books the payments other services announce, and issues invoices."""
