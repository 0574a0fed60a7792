"""Old import paths of the AI gateway, which is now the top-level app ``ai_gateway``.

Each module here makes its old name the new module itself (``sys.modules``), so a monkeypatch
or a cache reached through either name is the same. Only the names still imported by code
outside billing's owner remain; delete this package once they import ``ai_gateway`` directly.
"""
