"""Dead letters for people: list, show, replay and purge what the nodes dead-lettered (``kre-runner dead-letter``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from ..node.envelope import EnvelopeError, KreNatsMessage, decode

__all__ = ["DeadLetter", "read", "replay"]


@dataclass(frozen=True)
class DeadLetter:
    """One stored dead letter."""

    seq: int  # in the dead-letter stream
    subject: str
    headers: dict[str, str]
    data: bytes
    time: datetime

    def envelope(self) -> KreNatsMessage | None:
        try:
            return decode(self.data)
        except EnvelopeError:
            return None


async def read(js: JetStreamContext, stream: str, node: str | None = None) -> list[DeadLetter]:
    """Every dead letter in ``stream`` (of ``node`` when given), oldest first."""
    info = await js.stream_info(stream)
    letters: list[DeadLetter] = []
    if not info.state.messages:
        return letters  # an empty stream's first_seq can be 0, which the server refuses to get
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue  # purged or replayed
        headers = dict(msg.headers or {})
        if node is not None and headers.get("Kre-Node") != node:
            continue
        letters.append(DeadLetter(seq=msg.seq or seq, subject=msg.subject or "", headers=headers,
                                  data=msg.data or b"", time=_parse_time(headers.get("Kre-Time", ""))))
    return letters


async def replay(js: JetStreamContext, stream: str, letter: DeadLetter) -> None:
    """Publish the input again to its original subject (stored, checked), then remove the dead letter."""
    subject = letter.headers.get("Kre-Subject")
    if not subject:
        raise ValueError(f"dead letter {letter.seq} has no Kre-Subject header: cannot tell where to replay it")
    await js.publish(subject, letter.data)
    await js.delete_msg(stream, letter.seq)


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, timezone.utc)
