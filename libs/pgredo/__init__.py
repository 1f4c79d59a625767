"""Our own redo: a base page plus WAL records -> the page Postgres would have.

Layered on pgformat (formats, page layout, masks); no I/O. The redo service
and the page server both use it.
"""
