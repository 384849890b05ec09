"""The CLI's one table from how a run ended to the process exit code."""

import pytest

from pyvmm.cli.exitcodes import EXIT_ERROR, EXIT_HALTED, EXIT_OK, exit_code
from pyvmm.machine import StopReason, StopStatus


@pytest.mark.parametrize("reason,code", [
    (StopReason.POWEROFF, EXIT_OK), (StopReason.RESET, EXIT_OK), (StopReason.USER, EXIT_OK),
    (StopReason.HALTED, EXIT_HALTED), (StopReason.ERROR, EXIT_ERROR)])
def test_each_reason_has_its_code(reason, code):
    assert exit_code(StopStatus(reason, "why")) == code


@pytest.mark.parametrize("value,code", [(0, 1), (0x2A, 0x55), (0x10, 0x21)])
def test_debug_exit_is_qemus_odd_status(value, code):
    assert exit_code(StopStatus(StopReason.DEBUG_EXIT, "", value)) == code


def test_every_reason_is_mapped():
    for reason in StopReason:
        assert isinstance(exit_code(StopStatus(reason)), int)
