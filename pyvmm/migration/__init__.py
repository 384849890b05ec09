"""Live migration between pyvmm processes (issue 20 part 1): the stream
format (stream.py), the sending side's pre-copy (sender.py), the
destination's --incoming (receiver.py), where the stream goes (uri.py)
and the MAC announcement after the move (announce.py)."""
