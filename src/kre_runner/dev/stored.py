"""``kre-runner stored``: what the handlers saved with ``ctx.db``, ``ctx.prediction`` and ``ctx.measurement``.

Reads MongoDB (each collection: its document count and newest document) and, for VictoriaMetrics
(what ``up --services`` starts), each series name with its point count, so a developer checks a
handler's writes without a database client. Against an InfluxDB, the README gives the query.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from typing import Any

from ..config import redact_url

__all__ = ["stored"]


async def stored(mongo_uri: str | None, mongo_db: str | None, influx_url: str | None,
                 timeout: float = 5.0) -> list[str]:
    """Lines describing what is stored; a database that cannot be read says so in its line."""
    lines: list[str] = []
    if mongo_uri and mongo_db:
        lines += await asyncio.to_thread(_mongo, mongo_uri, mongo_db, timeout)
    if influx_url:
        lines += await asyncio.to_thread(_victoria_metrics, influx_url, timeout)
    return lines


def _mongo(uri: str, database: str, timeout: float) -> list[str]:
    from bson import json_util
    from pymongo import DESCENDING, MongoClient

    client: Any = MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000))
    try:
        db = client[database]
        names = sorted(db.list_collection_names())
        lines = [f"MongoDB {redact_url(uri)} database {database}: {len(names)} collection(s)"]
        for name in names:
            count = db[name].count_documents({})
            newest = db[name].find_one(sort=[("_id", DESCENDING)])
            shown = json_util.dumps(newest, ensure_ascii=False)
            lines.append(f"  {name}: {count} document(s); newest: {shown[:300]}")
        return lines
    except Exception as exc:
        return [f"MongoDB {redact_url(uri)}: cannot read it ({type(exc).__name__}: {exc})"]
    finally:
        client.close()


def _victoria_metrics(url: str, timeout: float) -> list[str]:
    import time

    base = url.rstrip("/")
    deadline = time.monotonic() + timeout
    try:
        # Points written in the last seconds become searchable about a second after a flush: a name
        # without points yet is read again until the deadline.
        urllib.request.urlopen(f"{base}/internal/force_flush", timeout=timeout).read()
        while True:
            lines, complete = _series(base, timeout)
            if complete or time.monotonic() > deadline:
                return lines
            time.sleep(0.3)
    except (OSError, ValueError) as exc:
        return [f"time series at {base}: cannot read them ({exc}); an InfluxDB is read with its own query API"]


def _series(base: str, timeout: float) -> tuple[list[str], bool]:
    with urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=timeout) as answer:
        names = json.load(answer).get("data") or []
    lines = [f"time series at {base}: {len(names)} series name(s)"]
    complete = True
    for name in sorted(names):
        query = urllib.parse.urlencode({"match[]": name})
        with urllib.request.urlopen(f"{base}/api/v1/export?{query}", timeout=timeout) as answer:
            series = [json.loads(line) for line in answer.read().splitlines() if line.strip()]
        points = sum(len(s.get("values", [])) for s in series)
        complete = complete and points > 0
        tags = sorted({f"{k}={v}" for s in series for k, v in s.get("metric", {}).items() if k != "__name__"})
        lines.append(f"  {name}: {points} point(s) in {len(series)} series ({', '.join(tags[:6])})")
    return lines, complete
