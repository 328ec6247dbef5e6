"""What a root hook does first: forget its environment and the limits it was started under.

Batch systems start root's hooks with environments and resource limits that partly come from the
job's user: Grid Engine hands the root prolog the job's whole environment (``qsub -v``) and its
``h_vmem`` as RLIMIT_AS; a hook inherits whatever ``ulimit`` its parent had. Nothing of that may
steer or stop a hook run as root:

- ``enter_root_hook()`` empties ``os.environ`` (which also empties the C environment that
  libvirt's client reads: ``LIBVIRT_DEBUG``, ``LIBVIRT_LOG_OUTPUTS``, ``LIBVIRT_DEFAULT_URI``...)
  and puts back only ``minimal_env()``. The adapters take a copy of the variables they read
  before calling it, and read them as data, never as settings. Nothing of ours has imported
  libvirt at that point (``python -I`` already ignores ``PYTHON*`` variables and the user's
  site directory).
- ``lift_limits()`` raises the limits that could kill a hook halfway (address space, CPU time,
  file size, data, stack) and ignores SIGXFSZ/SIGXCPU; core files stay off.
- Every subprocess gets ``minimal_env()`` (``proc.run`` does so when given no env).
"""
from __future__ import annotations

import os
import resource
import signal

ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UMASK = 0o022
_LIFTED = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK")


def minimal_env(**extra: str) -> dict[str, str]:
    """The whole environment a root hook's subprocess gets (plus ``extra``)."""
    return {"PATH": ROOT_PATH, "LC_ALL": "C", **extra}


def lift_limits() -> None:
    """No limit the batch system (or the job's user) set may kill us halfway; never a core."""
    for name in _LIFTED:
        which = getattr(resource, name)
        try:
            resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ValueError, OSError):   # not root, or no CAP_SYS_RESOURCE: as far as allowed
            hard = resource.getrlimit(which)[1]
            resource.setrlimit(which, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def enter_root_hook() -> None:
    """Empty the environment, lift the limits, set a sane umask: before any library is used."""
    os.environ.clear()
    os.environ.update(minimal_env())
    lift_limits()
    for sig in (signal.SIGXFSZ, signal.SIGXCPU):
        signal.signal(sig, signal.SIG_IGN)   # a limit we could not lift fails a call, not us
    os.umask(UMASK)
