"""The multi-process chaos test's parts: a PostgreSQL cluster the test owns, a channel
whose ledger is a PostgreSQL table, a worker process serving repayments, and the
driver that sends load and faults.  ``tests/test_chaos_pg.py`` runs them."""
