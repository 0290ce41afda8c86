"""The broker, a Django app: sockets (transport), the request core, the worker registry,
control (HTTP API, server actions), credentials, history and settings."""
