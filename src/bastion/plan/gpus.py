"""Accelerators the planner knows: memory as the device reports it (what vLLM's
`gpu_memory_utilization` is a share of), peak memory bandwidth and dense BF16 throughput from
the vendors' data sheets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPUS", "Gpu", "gpu"]

MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bandwidth_tb_s: float  # peak HBM/GDDR bandwidth, 10^12 bytes/s
    bf16_tflops: float  # dense (no sparsity), 10^12 FLOP/s
    description: str


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("h100-80gb", 81559 * MIB, 3.35, 989, "NVIDIA H100 SXM 80 GB HBM3"),
        Gpu("h100-pcie-80gb", 81559 * MIB, 2.0, 756, "NVIDIA H100 PCIe 80 GB HBM2e"),
        Gpu("h100-nvl-94gb", 95830 * MIB, 3.9, 835, "NVIDIA H100 NVL 94 GB HBM3"),
        Gpu("h200-141gb", 143771 * MIB, 4.8, 989, "NVIDIA H200 SXM 141 GB HBM3e"),
        Gpu("b200-180gb", 183359 * MIB, 8.0, 2250, "NVIDIA B200 180 GB HBM3e"),
        Gpu("a100-80gb", 81920 * MIB, 2.039, 312, "NVIDIA A100 SXM 80 GB HBM2e"),
        Gpu("a100-40gb", 40960 * MIB, 1.555, 312, "NVIDIA A100 40 GB HBM2"),
        Gpu("l40s-48gb", 46068 * MIB, 0.864, 362, "NVIDIA L40S 48 GB GDDR6"),
        Gpu("a10-24gb", 23028 * MIB, 0.6, 125, "NVIDIA A10 24 GB GDDR6"),
        Gpu("l4-24gb", 23034 * MIB, 0.3, 121, "NVIDIA L4 24 GB GDDR6"),
        Gpu("mi300x-192gb", 196592 * MIB, 5.3, 1307, "AMD Instinct MI300X 192 GB HBM3"),
        Gpu("mi325x-256gb", 262128 * MIB, 6.0, 1307, "AMD Instinct MI325X 256 GB HBM3e"),
    )
}


def gpu(name: str) -> Gpu:
    from bastion.plan.model import PlanError

    key = name.lower()
    if key not in GPUS:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
