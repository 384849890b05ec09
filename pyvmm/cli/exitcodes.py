"""pyvmm's process exit codes: the one place where how a run ended (a
machine's StopStatus, or an error) becomes the number the shell sees.
The machine and its engines only say why they stopped."""

from __future__ import annotations

from ..machine import StopReason, StopStatus

EXIT_OK = 0           # guest powered off, or reset with --no-reboot, or user quit
EXIT_ERROR = 1        # bad input or host problem (one-line error)
EXIT_USAGE = 2        # bad command line
EXIT_GUEST_CRASH = 3  # the engine could not go on (e.g. KVM emulation failure)
EXIT_HALTED = 4       # guest halted forever with interrupts disabled

EXIT_CODES_HELP = """exit codes:
  0    guest powered off, reset with --no-reboot, or the user quit (Ctrl-A x)
  1    error: bad input or a host problem (one line on stderr)
  2    bad command line
  3    the guest crashed in a way the engine cannot go on from (register dump on stderr)
  4    the guest halted with interrupts disabled (nothing can wake it)
  (v<<1)|1  the guest wrote v to the --debug-exit port (as QEMU's isa-debug-exit)
"""

_BY_REASON = {
    StopReason.POWEROFF: EXIT_OK,
    StopReason.RESET: EXIT_OK,     # reaches the exit only with --no-reboot or past the reboot limit
    StopReason.USER: EXIT_OK,
    StopReason.HALTED: EXIT_HALTED,
    StopReason.ERROR: EXIT_ERROR,
}


def exit_code(status: StopStatus) -> int:
    """The process exit code for a run that ended with `status`."""
    if status.reason is StopReason.DEBUG_EXIT:
        # QEMU's isa-debug-exit: odd, so a guest cannot fake a clean exit.
        return (status.value << 1) | 1
    return _BY_REASON[status.reason]
