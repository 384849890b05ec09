"""The `hw` engine: Linux KVM through /dev/kvm ioctls (ctypes, no bindings)."""
