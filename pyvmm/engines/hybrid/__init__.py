"""The hybrid engine: guest kernel code in bt, guest user code under KVM (engine.py)."""
