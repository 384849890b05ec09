"""The nano-benchmarks of Adams & Agesen (ASPLOS 2006: syscall, in, cr8wr,
call/ret, pgfault, divzero, ptemod) and forkwait, run by guestos (guestos/,
docs/guestos.md) under pyvmm bt, bt+PV, hw, hw+PV and QEMU TCG in one run;
one table of ns per operation with ratios to the QEMU column, then one line
`RESULT ptemod_bt_over_btpv=... forkwait_bt_over_btpv=... ...`.

    python3 bench/paper.py [--iters-bt N] [--forks-bt N] ... [--only bt,bt+pv]

Same code as `pyvmm bench paper` (pyvmm/guest/guestos.py: paper_main)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pyvmm.guest.guestos import paper_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(paper_main(sys.argv[1:]))
