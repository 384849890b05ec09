"""Every QMP command there is: commands.py holds the registry and the core
commands; the modules of their own (hotplug, inspection, snapshots,
migration) add theirs to it when imported.  Whoever runs commands imports
this module, so the registry is complete and no command module needs to
import the others back."""

from __future__ import annotations

from . import announce, hotplug, inspect, migration, snapshot  # noqa: F401  (each registers its commands)
from .commands import COMMANDS, HMP_COMMANDS, execute  # noqa: F401
