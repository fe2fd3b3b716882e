"""The bottom floor: configuration every other package may import and which imports none of them.

Settings (`fd2_config.settings`), queue and task names (`fd2_config.queues`), the Celery rules as data and the
one way to send the run task (`fd2_config.celery_config`), the embedded folder broker (`fd2_config.fs_broker`)
and the callback-host policy (`fd2_config.callback_hosts`). Importing any of them reads the environment at
most and never creates a folder: the service creates its folders when it starts (`Settings.ensure_dirs`).
"""
