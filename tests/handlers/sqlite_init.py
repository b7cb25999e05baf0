"""init makes a sqlite3 connection, which only the thread that made it may use; every call uses it."""

import sqlite3

from greeter_pb2 import Request, Response


def init(ctx):
    db = sqlite3.connect(":memory:")
    db.execute("create table seen (name text)")
    ctx.set("db", db)


def _seen(ctx, name: str) -> Response:
    db = ctx.get("db")
    db.execute("insert into seen values (?)", (name,))
    return Response(greeting=f"{name} {db.execute('select count(*) from seen').fetchone()[0]}")


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    return _seen(ctx, request.name)


def handler_batch(ctx, batch):
    results = []
    for data in batch:
        request = Request()
        data.Unpack(request)
        results.append(_seen(ctx, request.name))
    return results
