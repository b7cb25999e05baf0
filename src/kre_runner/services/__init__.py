"""The data services behind ``ctx.db``, ``ctx.measurement``, ``ctx.prediction``, ``ctx.configuration`` and
``ctx.object_store``, built from settings.

Nothing here connects at start: MongoDB is reached on first use and InfluxDB from a background
task, so a node starts (and keeps consuming) while a database is down; calls then fail or buffer
as documented in the README (Data services). The configuration and object store buckets are looked
up at start on the node's NATS connection; a missing one is a warning, not a failed start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

from ..config import Settings
from .configuration import Configuration, open_configuration
from .influx import InfluxSink, Measurement
from .mongo import DirectWriter, MongoConnection, MongoDB, MongoWriterClient
from .object_store import ObjectStore, open_object_store
from .prediction import Prediction

__all__ = ["Services", "open_services"]


@dataclass
class Services:
    """What :func:`open_services` built; ``None`` for what the settings leave out.

    ``influx`` is the sink the runner also feeds its elapsed-time points to.
    """

    db: MongoDB | None = None
    measurement: Measurement | None = None
    prediction: Prediction | None = None
    influx: InfluxSink | None = None
    configuration: Configuration | None = None
    object_store: ObjectStore | None = None

    async def close(self, timeout: float) -> None:
        """Flush buffered points for up to ``timeout`` seconds and close the database clients."""
        if self.configuration is not None:
            await self.configuration.close()
        if self.influx is not None:
            await self.influx.close(timeout)
        if self.db is not None:
            self.db.close()


async def open_services(settings: Settings, nc: NatsClient | None, logger: logging.Logger) -> Services:
    """Build the services ``settings`` enable and log one line per service saying what is (not) enabled.

    ``nc`` is the node's NATS connection, used for saves when ``KRT_NATS_MONGO_WRITER`` is set and for the
    configuration and object store buckets.
    Must be awaited inside the event loop that will use the services.
    """
    services = Services()
    reader = (MongoConnection(settings.mongo_uri, settings.mongo_db, settings.db_timeout)
              if settings.mongo_uri else None)
    writer: DirectWriter | MongoWriterClient | None = None
    if settings.mongo_writer_subject:
        if nc is None:
            raise ValueError("KRT_NATS_MONGO_WRITER is set but no NATS connection was given to open_services")
        writer = MongoWriterClient(nc, settings.mongo_writer_subject, settings.db_timeout)
    elif reader is not None:
        # Reads and direct writes share one client (one connection pool).
        writer = DirectWriter(reader)

    if writer is not None:
        services.db = MongoDB(writer, reader)
        services.prediction = Prediction(services.db.save, version_id=settings.version_id,
                                         version_name=settings.version)
        logger.info("ctx.db: %s (timeout %gs)", services.db.describe(), settings.db_timeout)
        logger.info("ctx.prediction: saves to collection classificationMetrics %s", writer.describe())
    else:
        logger.info("ctx.db: disabled (set KRT_MONGO_URI, and optionally KRT_NATS_MONGO_WRITER)")
        logger.info("ctx.prediction: disabled (set KRT_MONGO_URI or KRT_NATS_MONGO_WRITER)")

    if settings.influx_uri:
        services.influx = InfluxSink.from_settings(settings, logger)
        services.influx.start()
        services.measurement = Measurement(services.influx, version=settings.version,
                                           workflow=settings.workflow_name, node=settings.node_name)
        logger.info("ctx.measurement: InfluxDB %s; elapsed-time metrics %s", services.influx.describe(),
                    "on" if settings.elapsed_metrics else "off (KRT_ELAPSED_METRICS=false)")
    else:
        logger.info("ctx.measurement: disabled, and no elapsed-time metrics (set KRT_INFLUX_URI)")

    buckets = settings.configuration_buckets
    if buckets or settings.object_store:
        if nc is None:
            raise ValueError("KRT_NATS_KEY_VALUE_STORE_* or KRT_NATS_OBJECT_STORE is set but no NATS connection was "
                             "given to open_services")
        js = nc.jetstream()
        if buckets:
            services.configuration = await open_configuration(js, buckets, logger)
            logger.info("ctx.configuration: key-value buckets %s", services.configuration.describe())
        if settings.object_store:
            services.object_store, exists = await open_object_store(js, settings.object_store)
            if exists:
                logger.info("ctx.object_store: %s", services.object_store.describe())
            else:
                logger.warning("ctx.object_store: object store %s (KRT_NATS_OBJECT_STORE) does not exist: calls fail "
                               "until it does; create it with `kre-runner stream create` (in this node's environment) "
                               "or `nats object add %s`", settings.object_store, settings.object_store)
    if not buckets:
        logger.info("ctx.configuration: disabled (set KRT_NATS_KEY_VALUE_STORE_PROJECT, _WORKFLOW and _NODE)")
    if not settings.object_store:
        logger.info("ctx.object_store: disabled (set KRT_NATS_OBJECT_STORE)")
    return services
