"""Who may open an association with the listener: calling AE titles, optionally pinned to hosts."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from lesionwatch.config.schema import AllowedCaller, ListenerConfig

__all__ = ["ANY_AE_TITLE", "CallerPolicy"]

ANY_AE_TITLE = "*"

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _normalise_host(host: str) -> _Address | str:
    """An IP address object (IPv4-mapped IPv6 unwrapped), or the text for a non-address."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host.strip().lower()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class CallerPolicy:
    """The listener's allow-list and called-AE rule, evaluated per association request."""

    def __init__(
        self,
        allowed_callers: Iterable[AllowedCaller],
        *,
        ae_title: str,
        require_called_ae_title: bool = True,
    ) -> None:
        self._entries = [
            (caller.ae_title.strip(), None if caller.host is None else _normalise_host(caller.host))
            for caller in allowed_callers
        ]
        self.ae_title = ae_title.strip()
        self.require_called_ae_title = require_called_ae_title

    @classmethod
    def from_config(cls, listener: ListenerConfig) -> CallerPolicy:
        return cls(
            listener.allowed_callers,
            ae_title=listener.ae_title,
            require_called_ae_title=listener.require_called_ae_title,
        )

    def allowed_ae_titles(self, host: str) -> frozenset[str] | None:
        """Calling AE titles admitted from ``host``; ``None`` means any AE title."""
        source = _normalise_host(host)
        titles: set[str] = set()
        for ae_title, entry_host in self._entries:
            if entry_host is not None and entry_host != source:
                continue
            if ae_title == ANY_AE_TITLE:
                return None
            titles.add(ae_title)
        return frozenset(titles)

    def calling_rejection(self, calling_ae_title: str, host: str) -> str | None:
        """Why this calling AE from this host is refused, or ``None`` when it is admitted."""
        allowed = self.allowed_ae_titles(host)
        if allowed is None or calling_ae_title.strip() in allowed:
            return None
        if not allowed:
            return f"no calling AE title is allowed from {host} (listener.allowed_callers)"
        return (
            f"calling AE title {calling_ae_title.strip()!r} is not allowed from {host} "
            "(listener.allowed_callers)"
        )

    def called_rejection(self, called_ae_title: str) -> str | None:
        """Why the called AE title is refused, or ``None`` when it is accepted."""
        if not self.require_called_ae_title or called_ae_title.strip() == self.ae_title:
            return None
        called = called_ae_title.strip()
        return f"called AE title {called!r} is not this listener's {self.ae_title!r}"

    def rejection(self, calling_ae_title: str, called_ae_title: str, host: str) -> str | None:
        return self.calling_rejection(calling_ae_title, host) or self.called_rejection(
            called_ae_title
        )
