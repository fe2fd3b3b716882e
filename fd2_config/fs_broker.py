"""The embedded broker: kombu's filesystem transport made safe for several processes on one host.

Stock kombu writes a message file in place (a consumer polling at that moment can read it half written) and
moves claimed files to the system temp folder (a copy when that is another filesystem, so two consumers can
both get the message). Here a message appears under its final name only once complete (write + rename), and a
consumer claims it by renaming it into a folder on the same filesystem: exactly one rename can win.
"""

from __future__ import annotations

import os
import uuid
from queue import Empty
from time import time_ns

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads


class Channel(filesystem.Channel):
    """Filesystem channel with atomic publish and claim."""

    def _put(self, queue, payload, **kwargs):
        name = f"{time_ns() // 1000:020d}_{uuid.uuid4().hex}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f"partial-{uuid.uuid4().hex}")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add message to {self.data_folder_out!r}") from exc

    def _get(self, queue):
        wanted = f"{queue}.msg"
        claimed_dir = self.processed_folder
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != wanted:
                continue
            claimed = os.path.join(claimed_dir, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), claimed)
            except OSError:
                continue  # another consumer claimed it first
            try:
                with open(claimed, "rb") as handle:
                    payload = handle.read()
                os.remove(claimed)
            except OSError as exc:
                raise ChannelError(f"Cannot read claimed message {claimed!r}") from exc
            return loads(bytes_to_str(payload))
        raise Empty()


class Transport(filesystem.Transport):
    """Kombu transport class named by `broker_transport` in the embedded configuration."""

    Channel = Channel
