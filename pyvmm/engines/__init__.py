"""CPU engines: `hw` (Linux KVM) and `bt` (binary translation)."""
