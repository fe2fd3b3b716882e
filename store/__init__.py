"""Persistence shared by the API and the worker: settings, tables, sessions, migrations, repositories.

Torch-free and web-free by design, so both sides (and the CLI) can import it cheaply.
"""
