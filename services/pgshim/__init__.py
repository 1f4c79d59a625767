"""The libpq shim: the page server's API over the Postgres wire protocol.

A separate service in front of the page server (it talks to it over gRPC
only): `psql`, `pg_basebackup` and Neon-style compute clients connect to it
as if it were a Postgres server.
"""
