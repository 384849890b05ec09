"""Fault tolerance by record and replay (VMware's vLockstep) under the bt engine.

A primary runs the guest with deterministic time (guest ns from instructions
retired), so the only inputs that can make two runs differ come from
outside: console bytes, the wall clock, virtio-blk answers and frames
from the network.  record.py logs each such input
with the guest position (instructions retired, guest ns) at which the
primary applied it; replay.py applies the same inputs at the same positions
in a backup whose outputs go nowhere; commit.py holds the primary's outputs
until the backup has acknowledged the log that produced them; channel.py
carries the log and the acknowledgements, which double as heartbeats;
virtio.py puts disks and NICs under both; failover.py's lock lets exactly one member be live; setup.py hooks a
machine up; session.py is `pyvmm run --ft` and makes the backup live when
the primary is gone; reprotect.py (the live member) and seeded.py (a new
backup, `--ft-seed`) protect a member left running alone again by sending
its state as live migration does.  docs/ft.md says what is and is not recorded."""
