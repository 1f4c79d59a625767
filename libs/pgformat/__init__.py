"""Postgres on-disk and WAL formats, with no I/O.

Every service imports this library; it never imports a service. Modules follow
Postgres's own headers (cited in each module) so a reader can check a field
against its source.
"""
