"""PC legacy devices: UART, keyboard controller, CMOS RTC, POST port, debug exit."""

from .debug_exit import DebugExit
from .i8042 import I8042
from .port80 import Port80
from .rtc import Rtc
from .serial8250 import Serial8250

__all__ = ["DebugExit", "I8042", "Port80", "Rtc", "Serial8250"]
