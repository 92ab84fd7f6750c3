"""The uvicorn server for an app, with connection hygiene: header read, keep-alive and body timeouts, a cap.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but it arms that timer only after a response,
so a connection that never finishes its headers (or never sends any) stays open for ever. `_h11_with_header_timeout`
adds that timer: from the moment a connection opens, or a response completes, the next request's headers must be
complete within `header_timeout_s`. h11 itself bounds the header size (`h11_max_incomplete_event_size`).
"""

from __future__ import annotations

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServerLimits

MAX_HEADER_BYTES = 16 * 1024


def _h11_with_header_timeout(seconds: float) -> type:
    class H11WithHeaderTimeout(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(seconds, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()   # nothing was answered: the client is still sending its headers

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:   # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return H11WithHeaderTimeout


def uvicorn_config(app, host: str, port: int, limits: ServerLimits, **kwargs) -> uvicorn.Config:
    """A uvicorn.Config for `app` bounded by `limits` (the body bounds are the app's own middleware)."""
    return uvicorn.Config(app, host=host, port=port, http=_h11_with_header_timeout(limits.header_timeout_s),
                          timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.limit_concurrency,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
