"""A nats-py client with no server behind it: MSG bytes go in through its own parser, writes are kept.

As ``bench/instructions.py``'s stand-in, but what the client writes is kept for the test to read
(``parse_writes``), so a test can see every PUB, ack and pull request a real ``Consumer`` sends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nats.aio.client import Client
from nats.protocol.parser import Parser

__all__ = ["Publish", "StandIn", "parse_writes"]


class StandIn(Client):
    """A real nats-py client that believes it is connected; what it writes is kept for the test."""

    def __init__(self) -> None:
        super().__init__()
        self._status = Client.CONNECTED
        self._max_payload = 1024 * 1024
        self._skip_subject_validation = True
        self._ps = Parser(self)
        self._flush_queue = asyncio.Queue()
        self._flusher_task = asyncio.create_task(self._capture())
        self.written = bytearray()
        self._inboxes = 0

    async def _capture(self) -> None:
        while True:
            future = await self._flush_queue.get()
            self.take()
            if not future.done():
                future.set_result(None)

    def take(self) -> None:
        self.written += b"".join(self._pending)
        self._pending, self._pending_data_size = [], 0

    def new_inbox(self) -> str:
        self._inboxes += 1
        return f"_INBOX.fuzz{self._inboxes}"


@dataclass
class Publish:
    subject: str
    reply: str
    msg_id: str
    data: bytes


def parse_writes(buffer: bytearray) -> list[Publish]:
    """The PUB/HPUB commands in what the client wrote (SUB, UNSUB, PING lines are skipped)."""
    found = []
    while True:
        end = buffer.find(b"\r\n")
        if end < 0:
            return found
        words = bytes(buffer[:end]).split()
        del buffer[:end + 2]
        if not words or words[0] not in (b"PUB", b"HPUB"):
            continue
        if words[0] == b"PUB":
            subject, reply, size, header = words[1], (words[2] if len(words) == 4 else b""), int(words[-1]), b""
            body = bytes(buffer[:size])
        else:
            subject, reply = words[1], (words[2] if len(words) == 5 else b"")
            header_len, total = int(words[-2]), int(words[-1])
            header, body = bytes(buffer[:header_len]), bytes(buffer[header_len:total])
            size = total
        del buffer[:size + 2]
        msg_id = ""
        for line in header.split(b"\r\n"):
            if line.lower().startswith(b"nats-msg-id:"):
                msg_id = line.split(b":", 1)[1].strip().decode()
        found.append(Publish(subject.decode(), reply.decode(), msg_id, body))
