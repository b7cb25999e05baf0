"""One handler, behaviour chosen by the request name: errors, filters, pass-through, big outputs."""

from greeter_pb2 import Request, Response


def handler(ctx, data):
    request = Request()
    data.Unpack(request)
    name = request.name
    if name.startswith("boom"):
        raise ValueError(f"cannot greet {name}")
    if name.startswith("skip"):
        return None
    if name.startswith("pass"):
        return data  # the Any itself, forwarded unchanged
    if name.startswith("big"):
        return Response(greeting="big " * 600_000)  # 2.4 MB, over the 1 MiB max_payload
    if name.startswith("huge-random"):
        import os

        return Response(greeting=os.urandom(1_500_000).hex())  # incompressible below the limit
    if name.startswith("wrong"):
        return {"greeting": name}
    return Response(greeting=f"Hello, {name}!")
