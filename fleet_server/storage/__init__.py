"""The fleet server's database: SQLAlchemy 2.0, SQLite (WAL) by default, any URL.

``schema`` declares the tables on one ``Base``; ``database`` opens an engine and migrates
them to the newest revision (Alembic, ``migrate``); ``TelemetryStore`` and ``AlertStore``
read and write devices, windows and alerts.
"""

from fleet_server.storage.alert_store import AlertRecord, AlertStore
from fleet_server.storage.database import StorageError, database_url, open_database
from fleet_server.storage.schema import Base
from fleet_server.storage.telemetry_store import DeviceInfo, StoredWindow, TelemetryStore

__all__ = [
    "AlertRecord",
    "AlertStore",
    "Base",
    "DeviceInfo",
    "StorageError",
    "StoredWindow",
    "TelemetryStore",
    "database_url",
    "open_database",
]
