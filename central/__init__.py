"""The platform side: ingest workers that take what gateways send over MQTT into a store
(SQLite embedded, or PostgreSQL), the stores, and the `citygw platform` commands.

`worker.IngestWorker` subscribes (MQTT 5 shared subscription) and stores;
`stores.open_store` opens the SQLite or PostgreSQL store by URL.
"""
