"""Guest kernels fitted to pyvmm's virtual hardware: find or unpack a Linux
source tree (source), write a .config with only what pyvmm emulates
(fragment, config), build and check the bzImage (build); `pyvmm kernel
config|build` (cli)."""

from .build import BuildResult, build_kernel, check_image
from .config import (ConfigResult, KernelBuildError, KernelConfigError, ToolchainError,
                     generate_config, read_config)
from .fragment import FITTED, FORBIDDEN, FragmentRequest
from .source import KernelSourceError, cache_dir, default_build_dir, resolve_source

__all__ = ["BuildResult", "build_kernel", "check_image", "ConfigResult", "KernelBuildError",
           "KernelConfigError", "ToolchainError", "generate_config", "read_config", "FITTED",
           "FORBIDDEN", "FragmentRequest", "KernelSourceError", "cache_dir", "default_build_dir",
           "resolve_source"]
