"""pretranslate.py's failure path: an image that does not boot is reported
in one line, never raised (the build that came before it still stands).
The success path boots the fitted kernel: tests/test_kernel_build.py."""

from __future__ import annotations

from pyvmm.kernel.pretranslate import pretranslate


def test_an_image_that_does_not_boot_is_a_one_line_failure(tmp_path):
    image = tmp_path / "bzImage"
    image.write_bytes(b"not a kernel" * 100)
    res = pretranslate(image, str(tmp_path / "store"), timeout=120)
    assert not res.ok
    assert res.failure.startswith("exit ") and "pyvmm:" in res.failure, res.failure
    assert "\n" not in res.summary() and "first boot under bt will translate" in res.summary()
