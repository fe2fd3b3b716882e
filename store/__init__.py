"""Persistence shared by the API and the worker: tables, sessions, migrations, repositories, resource shapes.

It owns every change of a job's state (`store.jobs`, `store.job_states`); its configuration comes from
`fd2_config`. Torch-free and web-free by design, so both sides (and the CLI) can import it cheaply.
"""
