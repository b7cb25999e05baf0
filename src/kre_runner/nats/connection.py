"""The NATS connection every kre-runner process uses: credentials and TLS, bounded first connect, endless reconnects.

Why a failed start names one variable: in a pod the only feedback is the last log line, so a wrong
password, an untrusted certificate or a server without JetStream must say which ``KRT_*`` to fix,
in one line, without the secret.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ..config import NatsAuth, redact_url
from ..errors import StartupError

__all__ = ["StartupError", "check_jetstream", "connect", "connect_once", "nats_options"]


_NO_AUTH = NatsAuth()


def nats_options(auth: NatsAuth) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for the credentials and TLS files in ``auth``."""
    options: dict[str, Any] = {}
    if auth.creds is not None:
        options["user_credentials"] = str(auth.creds)
    if auth.nkey_seed is not None:
        options["nkeys_seed"] = str(auth.nkey_seed)
    if auth.token:
        options["token"] = auth.token
    if auth.user:
        options["user"] = auth.user
        options["password"] = auth.password
    if auth.uses_tls:
        options["tls"] = _tls_context(auth)
    return options


def _tls_context(auth: NatsAuth) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(auth.tls_ca) if auth.tls_ca else None)
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"KRT_NATS_TLS_CA={auth.tls_ca} is not a PEM CA certificate: {_reason(exc)}") from None
    if auth.tls_cert is not None:
        try:
            context.load_cert_chain(str(auth.tls_cert), str(auth.tls_key) if auth.tls_key else None)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"KRT_NATS_TLS_CERT={auth.tls_cert} and KRT_NATS_TLS_KEY={auth.tls_key} are not a "
                               f"matching PEM certificate and key: {_reason(exc)}") from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


async def connect(servers: tuple[str, ...], logger: logging.Logger, *, name: str,
                  auth: NatsAuth = _NO_AUTH,
                  on_reconnect: Callable[[], Awaitable[None]] | None = None,
                  on_connection_change: Callable[[bool], None] | None = None,
                  attempts: int = 10) -> Client:
    """Connect to NATS, retrying the first connection for a few seconds, then reconnecting forever.

    ``on_connection_change(connected)`` is called on every disconnect and reconnect (health).
    """
    shown = ", ".join(redact_url(s) for s in servers)
    options = nats_options(auth)

    client: Client | None = None
    connected = False
    errors: list[BaseException] = []

    async def disconnected() -> None:
        if client is not None and not client.is_closed:  # not our own close() at shutdown
            logger.warning("disconnected from NATS; reconnecting")
            if on_connection_change is not None:
                on_connection_change(False)

    async def reconnected() -> None:
        logger.info("reconnected to NATS")
        if on_connection_change is not None:
            on_connection_change(True)
        if on_reconnect is not None:
            await on_reconnect()

    hopeless = asyncio.Event()

    async def error(exc: Exception) -> None:
        if not connected:
            errors.append(exc)  # the first connect's failures explain themselves at the end, in one line
            # After a certificate it cannot verify, nats-py neither retries nor gives up (it hangs): a TLS
            # failure will not heal by itself within a start, so it ends the first connect at once.
            if isinstance(exc, ssl.SSLError):
                hopeless.set()
            return
        logger.warning("NATS: %s: %s", type(exc).__name__, _reason(exc))

    connect_timeout = 2.0
    attempt = asyncio.ensure_future(nats.connect(
        servers=list(servers),
        name=name,
        connect_timeout=connect_timeout,
        allow_reconnect=True,
        # Bounded for the first connection (pods start in any order, but a wrong URL must fail)...
        max_reconnect_attempts=attempts,
        reconnect_time_wait=0.5,
        skip_subject_validation=True,  # every subject was validated once, in config
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        **options,
    ))
    gave_up = asyncio.ensure_future(hopeless.wait())
    try:
        await asyncio.wait({attempt, gave_up}, return_when=asyncio.FIRST_COMPLETED,
                           timeout=attempts * (connect_timeout + 0.5) * max(1, len(servers)) + 5)
    except asyncio.CancelledError:  # SIGTERM while starting
        attempt.cancel()
        raise
    finally:
        gave_up.cancel()
    if not attempt.done():
        attempt.cancel()
        await asyncio.gather(attempt, return_exceptions=True)
        raise StartupError(_connect_failure(shown, auth, [*errors, TimeoutError("gave up")]))
    try:
        client = attempt.result()
    except Exception as exc:  # nats-py raises several types for an unreachable server
        raise StartupError(_connect_failure(shown, auth, [*errors, exc])) from None
    connected = True
    # ...and endless once connected: a running node rides out any server outage.
    client.options["max_reconnect_attempts"] = -1
    if on_connection_change is not None:
        on_connection_change(True)
    return client


async def connect_once(url: str, *, name: str = "kre-runner", timeout: float = 2.0) -> Client:
    """The short-lived connection of a command (``up --nats``, ``call``, ``trace``, ``dead-letter``, ``stream create``).

    One try per server, nats-py's own error logging silenced, and on failure a :class:`StartupError`
    of one line naming the address and the fix: a person at a terminal reads it, not a traceback.
    """
    servers = [s.strip() for s in url.split(",") if s.strip()]
    shown = ", ".join(redact_url(s) for s in servers)
    errors: list[BaseException] = []

    async def error(exc: Exception) -> None:
        errors.append(exc)

    try:
        return await asyncio.wait_for(
            # max_reconnect_attempts=1: each server at most twice (0 would mean "forever" to nats-py).
            nats.connect(servers=servers, name=name, connect_timeout=timeout, allow_reconnect=True,
                         max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=error),
            timeout * len(servers) + 1)
    except Exception as exc:  # nats-py raises several types for an unreachable server
        errors.append(exc)
    text = " ".join(f"{type(e).__name__} {e}" for e in errors).lower()
    if "authorization" in text or "authentication" in text:
        raise StartupError(f"NATS at {shown} refused the connection (authorization violation): give the user and "
                           f"password in the URL (nats://user:password@host:4222)")
    if any(isinstance(e, (asyncio.TimeoutError, nats.errors.TimeoutError)) for e in errors):
        raise StartupError(f"{shown} did not answer as a NATS server within {timeout:g}s: is that a nats-server's "
                           f"client port (4222 by default)? kre-runner up starts one")
    cause = next((e for e in errors if not isinstance(e, nats.errors.NoServersError)), errors[-1])
    reason = "connection refused" if isinstance(cause, ConnectionRefusedError) else _reason(cause)
    raise StartupError(f"cannot connect to NATS at {shown} ({reason}): is a nats-server running there? "
                       f"kre-runner up starts one")


def _connect_failure(shown: str, auth: NatsAuth, errors: list[BaseException]) -> str:
    """The one line that says why the first connect failed and which variable to fix."""
    text = " ".join(f"{type(e).__name__} {e}" for e in errors).lower()
    if "authorization violation" in text or "authorizationerror" in text or "authentication" in text:
        if auth.variable is None:
            return (f"NATS at {shown} refused the connection (authorization violation): it needs credentials: "
                    f"set KRT_NATS_CREDS, KRT_NATS_NKEY_SEED, KRT_NATS_TOKEN or KRT_NATS_USER/KRT_NATS_PASSWORD "
                    f"(or check the user in KRT_NATS_SERVER)")
        return (f"NATS at {shown} refused the credentials given by {auth.variable} (authorization violation): "
                f"check them, and that the server knows this user")
    verify = next((e for e in errors if isinstance(e, ssl.SSLCertVerificationError)), None)
    if verify is not None:
        return (f"cannot verify the TLS certificate of NATS at {shown}: {verify.verify_message or _reason(verify)}: "
                f"set KRT_NATS_TLS_CA to the CA that signed it (now {auth.tls_ca or 'unset: system CAs'})")
    tls = next((e for e in errors if isinstance(e, ssl.SSLError)), None)
    if tls is not None:
        return (f"TLS with NATS at {shown} failed: {_reason(tls)}: check KRT_NATS_TLS_CA, and KRT_NATS_TLS_CERT/"
                f"KRT_NATS_TLS_KEY when the server wants a client certificate")
    if "tls" in text and not auth.uses_tls:
        return (f"NATS at {shown} requires TLS: set KRT_NATS_TLS_CA (and KRT_NATS_TLS_CERT/KRT_NATS_TLS_KEY "
                f"for mutual TLS)")
    last = errors[-1]
    cause = next((e for e in reversed(errors) if not isinstance(e, nats.errors.NoServersError)), last)
    return f"cannot connect to NATS at {shown} (KRT_NATS_SERVER): {type(cause).__name__}: {_reason(cause)}"


async def check_jetstream(nc: Client, shown: str, timeout: float = 5.0) -> None:
    """Fail the start in one line when the server has no JetStream or this user may not use its API."""
    try:
        await nc.jetstream(timeout=timeout).account_info()
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
        raise StartupError(f"NATS at {shown} has no JetStream: start nats-server with -js (or a jetstream {{}} "
                           f"block in its configuration), or point KRT_NATS_SERVER at one that has it") from None
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        raise StartupError(f"the JetStream API of NATS at {shown} did not answer within {timeout:g}s: JetStream "
                           f"disabled for this account, or the user lacks permission to publish to $JS.API.> "
                           f"and subscribe to _INBOX.>") from None
    except nats.js.errors.APIError as exc:
        raise StartupError(f"the JetStream API of NATS at {shown} refused this account: {exc.description or exc} "
                           f"(is JetStream enabled for the account?)") from None
