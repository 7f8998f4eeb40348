"""The broker's web port: teoproxy-compatible WebSocket gateway and web pages (see docs/gateway.md)."""

from teomq.web.gateway import DEFAULT_WEB_PORT, WebGateway

__all__ = ["DEFAULT_WEB_PORT", "WebGateway"]
