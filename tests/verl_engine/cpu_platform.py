"""A CPU platform for verl 0.9.1, registered through verl's own platform registry (test support).

verl 0.9.1 ships platforms for NVIDIA, Ascend and ROCm only; without an accelerator it falls back to
"nvidia" and fails in ``torch.cuda.set_device``. ``use_cpu_platform()`` registers this class under
"cpu" (``PlatformRegistry.register``) and makes it the process's platform (``set_platform``). Call
it before importing ``verl.workers.engine``: ``transformer_impl`` reads the device name at import.

``current_device()`` returns "cpu", so verl's ``tensor.to(get_device_id())`` stays on the CPU;
collectives use gloo. The memory calls verl makes through ``get_torch_device()`` (``empty_cache``,
``max_memory_allocated``, ...) are answered with no-ops and zeros: the CPU has no caching allocator.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry, get_platform, set_platform


class _CPUDeviceModule:
    """``torch.cpu`` plus the CUDA-style memory calls verl makes, as no-ops."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def empty_cache(self) -> None:
        pass

    def set_per_process_memory_fraction(self, *args, **kwargs) -> None:
        pass

    def memory_allocated(self, *args, **kwargs) -> int:
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    def reset_peak_memory_stats(self, *args, **kwargs) -> None:
        pass

    def mem_get_info(self, *args, **kwargs) -> tuple[int, int]:
        return 0, 0

    def manual_seed(self, seed: int) -> None:
        pass  # the CPU generator is torch.manual_seed's


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    """The CPU as a verl platform: device "cpu", backend gloo, no profiler, no IPC."""

    _module = _CPUDeviceModule()

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: self._module)

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return False  # never auto-detected: chosen explicitly by use_cpu_platform()

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        pass

    def manual_seed_all(self, seed: int) -> None:
        pass

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CPU_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


_chosen = False


def use_cpu_platform() -> PlatformBase:
    """Make ``PlatformCPU`` verl's platform for this process (idempotent)."""
    global _chosen
    if not _chosen:
        set_platform(PlatformCPU())
        _chosen = True
    return get_platform()
