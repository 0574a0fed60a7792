"""A sandbox host's edge: the one door from the network to the gateways on that host.

Gateways listen only on the host's loopback. The portal reaches one on another host through
this ASGI app (``hostedge.app``), run by uvicorn on the host's own address
(``python -m hostedge``), which relays a WebSocket or an HTTP request to the gateway of one
sandbox placed on this host, for a request carrying a token the portal signed
(sandboxes.hostlink).
"""
