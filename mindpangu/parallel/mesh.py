"""Clusters: nodes x devices per node, with each device's peak FLOP/s and memory and the bandwidth inside and
between nodes. Presets carry the published figures (../papers: Pangu reports and DeepServe)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

from ..config import ConfigError
from ..config.schema import MeshConfig


@dataclass(frozen=True)
class Mesh:
    """A cluster, plus the few constants the simulator (mindpangu/sim) turns FLOPs and bytes into seconds with, the
    same for every prediction on it: a GEMM of F FLOPs runs at ``gemm_max_eff * F / (F + gemm_half_flops)`` of the
    peak (small GEMMs do not fill the device); a collective moves its bytes at ``bandwidth x intra_eff`` inside a
    node, ``x inter_eff`` between nodes, plus a latency per message step. Memory-bound work (norms, softmax,
    activations, residuals), which is not counted in FLOPs, scales like the tensor-parallel traffic (b x s x h bytes
    per layer) and is folded into ``intra_eff``."""
    name: str
    nodes: int
    devices_per_node: int
    peak_tflops: float      # dense fp16 / bf16 per device
    hbm_gb: float
    intra_node_gbps: float  # GB/s per device, one direction
    inter_node_gbps: float
    gemm_max_eff: float = 0.85
    gemm_half_flops: float = 2e10
    intra_eff: float = 0.25
    inter_eff: float = 0.5
    intra_latency_us: float = 5.0   # per message step of a collective (NCCL / HCCL order of magnitude, not fitted)
    inter_latency_us: float = 10.0

    def gemm_efficiency(self, flops: float) -> float:
        return self.gemm_max_eff * flops / (flops + self.gemm_half_flops)

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} devices = {self.devices}, "
                f"{self.peak_tflops:g} TFLOP/s and {self.hbm_gb:g} GB each, {self.intra_node_gbps:g} GB/s inside a "
                f"node, {self.inter_node_gbps:g} GB/s between nodes")


PRESETS: Dict[str, Mesh] = {
    # 8 x Ascend 910B per node, 64 GB HBM, HCCS full mesh inside a node, 200 Gb/s RoCE between nodes. The Pro MoE
    # paper quotes 256 TFLOPS fp16 for this server's accelerator (DeepServe says 400): set peak_tflops to taste.
    # The intra-node figure (7 HCCS links x 56 GB/s) is an assumption; the papers give none.
    "atlas_800t_a2": Mesh("atlas_800t_a2", 1, 8, 256.0, 64.0, 392.0, 25.0),
    # 48 servers x 8 Ascend 910C (2 dies: 2 x 400 TFLOPS, 2 x 64 GB) on one unified bus of ~200 GB/s per device.
    "cloudmatrix_384": Mesh("cloudmatrix_384", 48, 8, 800.0, 128.0, 200.0, 200.0),
    # DGX A100 80GB, for validation against published GPU runs: NVLink 3 (300 GB/s per direction), 8 x 200 Gb/s
    # HDR InfiniBand. Its efficiency constants reproduce Korthikanti et al. 2022 Table 5 (docs/simulator.md); the
    # Ascend presets use the same until an Ascend measurement pins them.
    "a100_80gb": Mesh("a100_80gb", 1, 8, 312.0, 80.0, 300.0, 25.0),
}


def resolve_mesh(cfg: Optional[MeshConfig] = None, name: str = "", devices: int = 0) -> Mesh:
    """The mesh of a YAML ``mesh:`` section or a preset ``name`` (which wins), sized for ``devices`` when the
    node count is left at 0."""
    cfg = cfg or MeshConfig()
    preset = name or cfg.preset
    if preset and preset not in PRESETS:
        raise ConfigError("mesh.preset", "unknown mesh", value=preset, allowed=", ".join(PRESETS))
    base = PRESETS[preset] if preset else Mesh("custom", 0, 0, 0.0, 0.0, 0.0, 0.0)
    fields = {k: getattr(cfg, k) for k in ("devices_per_node", "peak_tflops", "hbm_gb", "intra_node_gbps",
                                           "inter_node_gbps", "gemm_max_eff", "gemm_half_flops", "intra_eff",
                                           "inter_eff") if getattr(cfg, k)}
    mesh = replace(base, **fields)
    for key in ("devices_per_node", "peak_tflops", "hbm_gb", "intra_node_gbps", "inter_node_gbps"):
        if getattr(mesh, key) <= 0:
            raise ConfigError(f"mesh.{key}", "is needed when no mesh.preset is given", value=getattr(mesh, key),
                              allowed="a positive number, or mesh.preset: " + " | ".join(PRESETS))
    nodes = cfg.nodes or (-(-devices // mesh.devices_per_node) if devices else mesh.nodes) or 1
    return replace(mesh, nodes=nodes)
