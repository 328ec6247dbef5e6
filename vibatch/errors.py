"""One error hierarchy for vibatch.

Every failure is classified as the job's fault (a bad request: the batch system should fail that
job only, with the message in the job's output) or the node's fault (something on this host is
wrong: the batch system may requeue the job or take the node out of service). The exit codes of
the ``vibatch`` command are fixed here and documented in docs/exit-codes.md; the batch-system
adapters map the fault class to each system's own codes.
"""
from __future__ import annotations

import enum


class Fault(enum.StrEnum):
    """Whose fault a failure is: the one vocabulary of the CLI, the core and the adapters (each
    adapter maps it to its system's exit codes in one table, vibatch/batch/<system>.py)."""

    JOB = "job"     # the request is wrong: fail this job only
    NODE = "node"   # this node is wrong: requeue / take the node out, per system


class VibatchError(Exception):
    """Base class. ``exit_code`` is what the ``vibatch`` CLI exits with."""

    fault = Fault.NODE
    exit_code = 20

    def __init__(self, message: str, *, detail: str = ""):
        super().__init__(message)
        self.message = message
        self.detail = detail  # extra lines (console tail, stderr) for the job's output

    def __str__(self) -> str:
        return self.message


def fault_of(exc: BaseException) -> Fault:
    """A VibatchError says whose fault it is; anything else (a bug) is the node's, never the
    user's."""
    return exc.fault if isinstance(exc, VibatchError) else Fault.NODE


class UsageError(VibatchError):
    """Bad command-line arguments found after parsing (as argparse exits)."""

    exit_code = 2


# --- the job's fault (exit codes 10-19) ----------------------------------------------------
class JobError(VibatchError):
    fault = Fault.JOB
    exit_code = 10


class UnknownImage(JobError):
    exit_code = 11


class ResourceRequestError(JobError):
    exit_code = 12


class BadJobId(JobError):
    exit_code = 13


class UnknownUser(JobError):
    exit_code = 14


class MissingWorkdir(JobError):
    exit_code = 15


class JobAlreadyRunning(JobError):
    exit_code = 16


class ImageNotAllowed(UnknownImage):
    """The image exists but the site's policy does not let this job use it."""


# --- the node's fault (exit codes 20-29) -----------------------------------------------------
class NodeError(VibatchError):
    fault = Fault.NODE
    exit_code = 20


class BootFailed(NodeError):
    exit_code = 21


class HypervisorError(NodeError):
    exit_code = 22


class ImageIntegrityError(NodeError):
    exit_code = 23


class LockTimeout(NodeError):
    exit_code = 24


class NoFreeSlot(NodeError):
    exit_code = 25


class ConfigError(NodeError):
    exit_code = 26


class CommandFailed(NodeError):
    """A host tool (qemu-img, ...) failed or timed out."""

    exit_code = 27


# --- the image library's admin commands (exit codes 30-39) -----------------------------------
class LibraryError(NodeError):
    exit_code = 30


class ImageRejected(LibraryError):
    """An image file is unsafe, or does not match what its catalog entry or manifest says."""

    exit_code = 31


class CatalogRejected(LibraryError):
    """A catalog failed its signature, format, expiry or rollback checks."""

    exit_code = 32


class ImageInUse(LibraryError):
    exit_code = 33


class DownloadFailed(LibraryError):
    exit_code = 34


class ImageTestFailed(LibraryError):
    exit_code = 35


# --- vibatch exec: like podman/docker run, 125 = the tool failed before the command ran ----
class ExecError(VibatchError):
    fault = Fault.JOB
    exit_code = 125


EXIT_CODES = {
    0: "success",
    2: "bad command-line arguments",
    10: "the job's request is invalid (job fault)",
    11: "unknown or forbidden image (job fault)",
    12: "more cores or memory than this node can give, or invalid amounts (job fault)",
    13: "invalid job id (job fault)",
    14: "the job's user does not exist or is not allowed (job fault)",
    15: "the working directory is missing or the job's user may not reach it (job fault)",
    16: "a VM for this job already exists or is being prepared (job fault)",
    20: "node error (node fault)",
    21: "the guest did not boot or answer in time (node fault)",
    22: "libvirt/QEMU error (node fault)",
    23: "the library image does not match its recorded digest (node fault)",
    24: "a lock could not be taken in time (node fault)",
    25: "no free CPUs or memory for this job's slot (node fault)",
    26: "invalid configuration (node fault)",
    27: "a host tool failed or timed out (node fault)",
    30: "image library error (admin command)",
    31: "an image file is unsafe or does not match its digest (admin command)",
    32: "a catalog failed its signature, expiry or rollback checks (admin command)",
    33: "the image is used by a running job (admin command)",
    34: "a download failed (admin command)",
    35: "a check of vibatch image test failed",
    36: "a check of vibatch doctor failed",
    125: "vibatch exec could not run the command (no VM for this job, or not yours)",
}
