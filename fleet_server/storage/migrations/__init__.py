"""Alembic migrations of the fleet database, run by ``fleet_server.storage.migrate``.

``env.py`` runs on the connection that ``migrate`` hands over; ``versions/`` holds one
file per revision (``0001`` the first release's tables, then one per schema change).
Revisions never import ``schema``: they describe the tables as they were at that revision.
"""
