"""``ctx.prediction``: store a classification result for the KRE metrics views.

Documents go to collection ``classificationMetrics`` through the same write path as ``ctx.db.save``
(direct or mongo-writer), in the exact shape the original runner wrote.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = ["COLLECTION", "ERR_MISSING_VALUES", "ERR_NEW_LABELS", "Prediction"]

COLLECTION = "classificationMetrics"
ERR_MISSING_VALUES = "missing_values"
ERR_NEW_LABELS = "new_labels"
_ERRORS = ("", ERR_MISSING_VALUES, ERR_NEW_LABELS)


class Prediction:
    """``await ctx.prediction.save(predicted_value, true_value, extra=None, utcdate=None, error="")``."""

    ERR_MISSING_VALUES = ERR_MISSING_VALUES
    ERR_NEW_LABELS = ERR_NEW_LABELS

    def __init__(self, save: Callable[[str, Mapping[str, Any]], Awaitable[None]], *, version_id: str,
                 version_name: str) -> None:
        self._save = save
        self._version_id = version_id
        self._version_name = version_name

    async def save(
        self,
        predicted_value: str = "",
        true_value: str = "",
        extra: Mapping[str, Any] | None = None,
        utcdate: datetime | None = None,
        error: str = "",
    ) -> None:
        """Store one prediction; raises ``ValueError``/``TypeError`` for bad arguments and
        :class:`~kre_runner.services.mongo.DatabaseError` when it could not be stored."""
        await self._save(COLLECTION, self.document(predicted_value, true_value, extra, utcdate, error))

    def document(
        self,
        predicted_value: str = "",
        true_value: str = "",
        extra: Mapping[str, Any] | None = None,
        utcdate: datetime | None = None,
        error: str = "",
    ) -> dict[str, Any]:
        """The document :meth:`save` stores, after the original's validation."""
        if error not in _ERRORS:
            raise ValueError(f"ctx.prediction.save: error must be '', {ERR_MISSING_VALUES!r} or "
                             f"{ERR_NEW_LABELS!r}, got {error!r}")
        if not isinstance(predicted_value, str) or not isinstance(true_value, str):
            raise TypeError("ctx.prediction.save: predicted_value and true_value must be strings")
        if not error and (not predicted_value or not true_value):
            raise ValueError("ctx.prediction.save: predicted_value and true_value must be non-empty strings "
                             "unless error is set")
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"ctx.prediction.save: extra must be a dict or None, got {type(extra).__name__}")
        return {
            "date": _rfc3339(utcdate),
            "error": error,
            "predictedValue": predicted_value,
            "trueValue": true_value,
            "extra": dict(extra) if extra is not None else None,
            "versionId": self._version_id,
            "versionName": self._version_name,
        }


def _rfc3339(utcdate: datetime | None) -> str:
    """``2022-06-01T12:00:00.000123Z``; naive datetimes are taken as UTC, other time zones refused."""
    if utcdate is None:
        utcdate = datetime.now(timezone.utc)
    elif not isinstance(utcdate, datetime):
        raise TypeError(f"ctx.prediction.save: utcdate must be a datetime, got {type(utcdate).__name__}")
    elif utcdate.tzinfo is not None:
        if utcdate.utcoffset() != timedelta(0):
            raise ValueError(f"ctx.prediction.save: utcdate must be in UTC, got offset {utcdate.utcoffset()}")
        utcdate = utcdate.replace(tzinfo=None)
    return utcdate.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
