"""Emulated devices. Each knows only offsets inside its own range; the
builder places them on the buses and connects IRQ lines and sinks."""
