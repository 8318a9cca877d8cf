"""A free TCP port for a rendezvous (torch.distributed's MASTER_PORT, the DeepSpeed launcher's
``--master_port``): one owner for the trainer, the sweep launchers and the multi-process tests."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS reports free now. Two single-process runs on one machine once collided on a
    pid-derived port (EADDRINUSE at start-up); asking the OS avoids that."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
