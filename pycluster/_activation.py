"""Socket activation: the listening sockets a service manager (systemd) passed us.

systemd's protocol (``sd_listen_fds(3)``): ``LISTEN_PID`` is the pid the sockets are
meant for, ``LISTEN_FDS`` how many there are, starting at file descriptor 3, and
``LISTEN_FDNAMES`` optionally names them. The variables are removed once read, so the
workers (and their children) never take the sockets for theirs.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from ._errors import SettingsError

__all__ = ["FIRST_FD", "listen_fds"]

#: The first file descriptor systemd passes (after stdin, stdout and stderr).
FIRST_FD = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None
               ) -> tuple[list[str], str | None]:
    """Read (and remove) the socket-activation variables from *environ* (default
    ``os.environ``).

    Returns the sockets as ``fd://N`` bind addresses, and a warning for people when
    sockets were passed to another process (``LISTEN_PID`` is not *pid*, default this
    process): they are then left alone, as ``sd_listen_fds()`` does.

    Raises:
        SettingsError: ``LISTEN_FDS`` or ``LISTEN_PID`` is not a whole number.
    """
    env = os.environ if environ is None else environ
    count_text = env.get("LISTEN_FDS")
    pid_text = env.get("LISTEN_PID")
    for name in _VARIABLES:
        env.pop(name, None)
    if count_text is None:
        return [], None
    me = os.getpid() if pid is None else pid
    if pid_text is None or not pid_text.strip().isdigit() or not count_text.strip().isdigit():
        msg = (
            f"socket activation: LISTEN_FDS={count_text!r} and LISTEN_PID={pid_text!r} must "
            "both be whole numbers (set by systemd, or by a launcher that passes sockets)"
        )
        raise SettingsError(msg)
    if int(pid_text) != me:
        warning = (
            f"LISTEN_FDS={count_text} is meant for pid {int(pid_text)}, not this process "
            f"({me}); ignoring the inherited sockets"
        )
        return [], warning
    return [f"fd://{fd}" for fd in range(FIRST_FD, FIRST_FD + int(count_text))], None
