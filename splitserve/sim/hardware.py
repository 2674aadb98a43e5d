"""Hardware and interconnect catalog for the simulator. Every number carries its source.

Units: bytes, bytes/s, FLOP/s, watts, seconds. "Peak" compute is the dense (no sparsity) figure
unless a comment says otherwise. Power is per unit (one GPU / chip / system) at its rated
maximum, plus `infra_w` where an accelerator needs a host the figure does not include.
`price_per_hour` is a *parameter* (a default list-price assumption, USD per unit-hour, override
with `--price`), not a measurement: cloud prices move monthly and vary by commitment.

A *unit* is what `--hardware HW:N` counts: one GPU, one TPU chip, one Trainium chip, one Groq
LPU chip, one Cerebras CS-3 system.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GB = 1e9
GiB = 2**30
TB = 1e12
PB = 1e15


@dataclass(frozen=True)
class Link:
    """A point-to-point or collective interconnect as the cost model sees it: bandwidth per unit
    and direction, and a one-way latency that includes the software stack for small messages."""

    name: str
    bandwidth: float  # bytes/s, per unit, one direction
    latency_s: float
    source: str = ""

    def transfer_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


LINKS: dict[str, Link] = {
    "nvlink4": Link("nvlink4", 450 * GB, 3e-6,
                    "NVIDIA H100 datasheet: NVLink 4 900 GB/s bidirectional per GPU (450 GB/s each way); "
                    "latency: NCCL small-message all-reduce ~3-10 us (assumption)"),
    "nvlink5": Link("nvlink5", 900 * GB, 3e-6,
                    "NVIDIA Blackwell datasheet: NVLink 5 1.8 TB/s bidirectional per GPU"),
    "ib-ndr": Link("ib-ndr", 50 * GB, 5e-6,
                   "NVIDIA Quantum-2 InfiniBand NDR: 400 Gb/s per port (one port per GPU in DGX H100); "
                   "~1-2 us switch+NIC latency, ~5 us with the software stack"),
    "ib-xdr": Link("ib-xdr", 100 * GB, 5e-6, "NVIDIA Quantum-X800 InfiniBand XDR: 800 Gb/s per port"),
    "efa": Link("efa", 400 * GB / 16, 15e-6,
                "AWS EFA: 3,200 Gbps per trn2.48xlarge / p5.48xlarge instance (400 GB/s), shared by "
                "16 Trainium2 chips (25 GB/s each); latency ~15 us (SRD, assumption)"),
    "efa-instance": Link("efa-instance", 400 * GB, 15e-6, "AWS EFA: 3,200 Gbps per instance, one instance's worth"),
    "neuronlink": Link("neuronlink", 1 * TB / 2, 3e-6,
                       "AWS Trainium2: NeuronLink-v3 1 TB/s chip-to-chip per chip (bidirectional)"),
    "ici-v6e": Link("ici-v6e", 448 * GB / 2, 5e-6, "Google Cloud TPU v6e docs: ICI 3,584 Gbps per chip"),
    "ici-ironwood": Link("ici-ironwood", 1.2 * TB / 2, 5e-6,
                         "Google, 'Ironwood: the first Google TPU for the age of inference' (Apr 2025): "
                         "ICI 1.2 TB/s bidirectional per chip"),
    "infinity-fabric": Link("infinity-fabric", 896 * GB / 2, 4e-6,
                            "AMD Instinct MI300X datasheet: 7 Infinity Fabric links, 896 GB/s aggregate"),
    "infinity-fabric-mi355": Link("infinity-fabric-mi355", 1075 * GB / 2, 4e-6,
                                  "AMD Instinct MI355X: 7 Infinity Fabric links at 153.6 GB/s, 1,075 GB/s"),
    "groq-c2c": Link("groq-c2c", 16 * 12.5 * GB, 1e-6,
                     "Groq LPU product brief: 16 chip-to-chip links (RealScale); ~100 Gb/s each (assumption)"),
    "cs3-io": Link("cs3-io", 12 * 100e9 / 8, 10e-6,
                   "Cerebras CS-3: 12 x 100 GbE system I/O (150 GB/s); ~10 us Ethernet latency (assumption)"),
    "pcie5": Link("pcie5", 64 * GB, 5e-6, "PCIe 5.0 x16: 64 GB/s each way"),
    "nvlink3": Link("nvlink3", 300 * GB, 3e-6, "NVIDIA A100 datasheet: NVLink 3 600 GB/s bidirectional per GPU"),
    "nvlink-bridge": Link("nvlink-bridge", 450 * GB, 3e-6,
                          "NVIDIA H200 NVL datasheet: 2- or 4-way NVLink bridge, 900 GB/s bidirectional per GPU"),
    "ib-hdr": Link("ib-hdr", 25 * GB, 5e-6, "NVIDIA Quantum InfiniBand HDR: 200 Gb/s per port (DGX A100)"),
    "ici-v5e": Link("ici-v5e", 200 * GB / 2, 5e-6, "Google Cloud TPU v5e documentation: ICI 1,600 Gbps per chip"),
    "samba-rdu": Link("samba-rdu", 200 * GB / 2, 5e-6,
                      "SambaNova SN40L peer-to-peer RDU links inside a SambaRack: bandwidth not published "
                      "(assumption)"),
    "tcp-loopback": Link("tcp-loopback", 2 * GB, 50e-6, "this machine's loopback TCP (order of magnitude)"),
}


@dataclass(frozen=True)
class Hardware:
    name: str
    title: str
    family: str  # cost-model family (families.py): hopper | blackwell | ampere | mi300 | mi355 | trainium |
    # tpu | rdu | lpu | wafer | cpu
    memory_bytes: float  # memory that holds weights and KV (HBM, or on-chip SRAM for LPU / CS-3)
    mem_bandwidth: float  # bytes/s
    flops: dict[str, float]  # peak dense FLOP/s by compute dtype: bf16, fp8, fp4
    power_w: float
    price_per_hour: float  # USD per unit-hour (parameter)
    scale_up: str  # link between units of one replica (tensor/pipeline parallel)
    scale_out: str  # link between replicas / prefill and decode pools by default
    scale_up_size: int = 8  # units in one scale-up domain (tensor parallel stays inside it)
    memory_usable: float = 0.9  # fraction of memory for weights + KV (runtime, activations)
    sources: tuple[str, ...] = ()
    notes: str = ""
    aliases: tuple[str, ...] = ()
    calibration: dict = field(default_factory=dict, compare=False)  # local-cpu only

    def peak_flops(self, compute_dtype: str) -> float:
        """Peak for the dtype the matmuls run in; falls back to the next wider dtype supported."""
        for d in {"fp4": ("fp4", "fp8", "bf16"), "fp8": ("fp8", "bf16"), "bf16": ("bf16",),
                  "fp32": ("fp32", "bf16")}.get(compute_dtype, ("bf16",)):
            if d in self.flops:
                return self.flops[d]
        return self.flops["bf16"]


_CATALOG: list[Hardware] = [
    Hardware(
        "cs3", "Cerebras CS-3 (WSE-3)", "wafer", 44 * GB, 21 * PB,
        {"bf16": 125 * PB, "fp8": 125 * PB},
        23_000, 60.0, "cs3-io", "cs3-io", scale_up_size=64, memory_usable=0.95,
        sources=(
            "Cerebras WSE-3 / CS-3 launch, 13 Mar 2024: 4 trillion transistors, 900,000 cores, 44 GB "
            "on-chip SRAM, 21 PB/s memory bandwidth, 125 PFLOPS peak AI (FP16, as published)",
            "Power: ~23 kW per CS-3 system (Cerebras CS-3 system specification)",
            "Cerebras Inference launch, 27 Aug 2024: Llama-3.1-70B at 16-bit runs on four CS-3 systems",
            "Price: assumption (~$2.5M system amortised over 3 years + power/facility), override with --price",
        ),
        notes="weights stay resident in SRAM; models over 44 GB are pipelined across systems",
        aliases=("cerebras", "wse3", "cs-3"),
    ),
    Hardware(
        "groq-lpu", "Groq LPU (GroqChip)", "lpu", 230e6, 80 * TB,
        {"bf16": 188 * TB, "fp8": 750 * TB},
        300, 1.5, "groq-c2c", "groq-c2c", scale_up_size=10_000, memory_usable=0.95,
        sources=(
            "Groq LPU product brief: 230 MB on-die SRAM, 80 TB/s, 188 TFLOPS FP16, 750 TOPS INT8",
            "GroqCard datasheet: 375 W max, ~240 W typical per card; 300 W used here",
            "Price: assumption, override with --price",
        ),
        notes="one chip holds ~230 MB: an 8B model at 8-bit spans ~40 chips, pipelined layer by layer",
        aliases=("groq", "lpu"),
    ),
    Hardware(
        "trn2", "AWS Trainium2", "trainium", 96 * GiB, 2.9 * TB,
        {"bf16": 667 * TB, "fp8": 1299 * TB},
        500, 2.80, "neuronlink", "efa", scale_up_size=16,
        sources=(
            "AWS Trainium2 (re:Invent 2024): 96 GiB HBM, 2.9 TB/s, 667 TFLOPS BF16 dense, "
            "1,299 TFLOPS FP8 dense; trn2.48xlarge = 16 chips, NeuronLink-v3, 3.2 Tbps EFAv3",
            "Power: ~500 W per chip (assumption, not published)",
            "Price: trn2.48xlarge on-demand ~$44.7/h / 16 chips (us-east, 2025), override with --price",
        ),
        aliases=("trainium2",),
    ),
    Hardware(
        "trn3", "AWS Trainium3", "trainium", 144 * GiB, 4.9 * TB,
        {"bf16": 671 * TB, "fp8": 2520 * TB},
        700, 4.00, "neuronlink", "efa", scale_up_size=64,
        sources=(
            "AWS Trainium3 (re:Invent 2025): 144 GiB HBM3e, 4.9 TB/s, 671 TFLOPS BF16, 2.52 PFLOPS FP8",
            "Power and price: assumptions, override with --price",
        ),
        aliases=("trainium3",),
    ),
    Hardware(
        "h100", "NVIDIA H100 SXM5 80GB", "hopper", 80 * GB, 3.35 * TB,
        {"bf16": 989 * TB, "fp8": 1979 * TB},
        700, 2.99, "nvlink4", "ib-ndr",
        sources=(
            "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3, 3.35 TB/s, BF16 989 TFLOPS and FP8 "
            "1,979 TFLOPS dense (half the with-sparsity figures), up to 700 W, NVLink 900 GB/s",
            "Price: on-demand H100 SXM cloud list price ~$2.99/GPU-hour (2025), override with --price",
        ),
        aliases=("h100-sxm", "h100-sxm5"),
    ),
    Hardware(
        "h200", "NVIDIA H200 SXM 141GB", "hopper", 141 * GB, 4.8 * TB,
        {"bf16": 989 * TB, "fp8": 1979 * TB},
        700, 3.50, "nvlink4", "ib-ndr",
        sources=(
            "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e, 4.8 TB/s, same compute as H100 SXM, "
            "up to 700 W",
            "Price: assumption ~$3.50/GPU-hour, override with --price",
        ),
    ),
    Hardware(
        "b200", "NVIDIA B200 180GB", "blackwell", 180 * GB, 8 * TB,
        {"bf16": 2250 * TB, "fp8": 4500 * TB, "fp4": 9000 * TB},
        1000, 5.50, "nvlink5", "ib-xdr",
        sources=(
            "NVIDIA HGX B200 datasheet: 180 GB HBM3e per GPU, 8 TB/s, FP8 4.5 PFLOPS dense, FP4 9 PFLOPS "
            "dense, BF16 2.25 PFLOPS dense; 1,000 W per GPU; NVLink 5 1.8 TB/s",
            "Price: assumption ~$5.50/GPU-hour, override with --price",
        ),
    ),
    Hardware(
        "b300", "NVIDIA B300 (Blackwell Ultra) 288GB", "blackwell", 288 * GB, 8 * TB,
        {"bf16": 2250 * TB, "fp8": 4500 * TB, "fp4": 13500 * TB},
        1100, 7.00, "nvlink5", "ib-xdr",
        sources=(
            "NVIDIA HGX B300 datasheet (2025): 288 GB HBM3e per GPU, 8 TB/s, dense FP4 ~13.5-15 PFLOPS "
            "(1.5x B200), FP8/BF16 as B200; ~1,100 W per GPU",
            "Price: assumption, override with --price",
        ),
        aliases=("gb300",),
    ),
    Hardware(
        "mi300x", "AMD Instinct MI300X", "mi300", 192 * GB, 5.3 * TB,
        {"bf16": 1307 * TB, "fp8": 2615 * TB},
        750, 2.50, "infinity-fabric", "ib-ndr",
        sources=(
            "AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, FP16/BF16 1,307.4 TFLOPS and FP8 "
            "2,614.9 TFLOPS dense, 750 W, Infinity Fabric 896 GB/s",
            "Price: assumption, override with --price",
        ),
    ),
    Hardware(
        "mi355x", "AMD Instinct MI355X", "mi355", 288 * GB, 8 * TB,
        {"bf16": 2500 * TB, "fp8": 5000 * TB, "fp4": 10000 * TB},
        1400, 4.50, "infinity-fabric-mi355", "ib-xdr",
        sources=(
            "AMD Instinct MI355X (June 2025): 288 GB HBM3E, 8 TB/s, FP16 2.5 PFLOPS, FP8 5 PFLOPS, "
            "MXFP4 10 PFLOPS dense; 1,400 W",
            "Price: assumption, override with --price",
        ),
    ),
    Hardware(
        "tpu-v6e", "Google TPU v6e (Trillium)", "tpu", 32 * GB, 1.64 * TB,
        {"bf16": 918 * TB, "fp8": 1836 * TB},
        300, 2.70, "ici-v6e", "ici-v6e", scale_up_size=256,
        sources=(
            "Google Cloud TPU v6e documentation: 32 GB HBM, 1,640 GB/s, 918 TFLOPS BF16, 1,836 TOPS INT8, "
            "ICI 3,584 Gbps per chip, pods of 256 chips",
            "Power: not published; ~300 W assumed. Price: Cloud TPU v6e on-demand $2.70/chip-hour",
        ),
        aliases=("trillium", "v6e"),
    ),
    Hardware(
        "tpu-ironwood", "Google TPU Ironwood (v7)", "tpu", 192 * GB, 7.37 * TB,
        {"bf16": 2307 * TB, "fp8": 4614 * TB},
        1000, 6.00, "ici-ironwood", "ici-ironwood", scale_up_size=9216,
        sources=(
            "Google, 'Ironwood: the first Google TPU for the age of inference' (Apr 2025): 192 GB HBM, "
            "7.37 TB/s, 4,614 TFLOPS FP8 peak per chip, ICI 1.2 TB/s; BF16 taken as half the FP8 peak",
            "Power and price: assumptions, override with --price",
        ),
        aliases=("ironwood", "tpu-v7"),
    ),
    Hardware(
        "a100", "NVIDIA A100 SXM4 80GB", "ampere", 80 * GB, 2.039 * TB,
        {"bf16": 312 * TB},
        400, 1.50, "nvlink3", "ib-hdr",
        sources=(
            "NVIDIA A100 Tensor Core GPU datasheet: 80 GB HBM2e, 2,039 GB/s, BF16/FP16 312 TFLOPS dense, "
            "400 W (SXM), NVLink 600 GB/s; no FP8 (8-bit weights run on the 16-bit units here); the "
            "testbed of DistServe, Splitwise and Mooncake",
            "Price: assumption ~$1.50/GPU-hour, override with --price",
        ),
        aliases=("a100-80gb", "a100-sxm"),
    ),
    Hardware(
        "h200-nvl", "NVIDIA H200 NVL 141GB (PCIe)", "hopper", 141 * GB, 4.8 * TB,
        {"bf16": 835 * TB, "fp8": 1671 * TB},
        600, 3.20, "nvlink-bridge", "ib-ndr", scale_up_size=4,
        sources=(
            "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL column: 141 GB HBM3e, 4.8 TB/s, FP8 3,341 and "
            "BF16 1,671 TFLOPS with sparsity (half dense), up to 600 W, 2- or 4-way NVLink bridge 900 GB/s",
            "Price: assumption, override with --price",
        ),
        aliases=("h200nvl",),
    ),
    Hardware(
        "gb200", "NVIDIA GB200 NVL72 (per Blackwell GPU)", "blackwell", 186 * GB, 8 * TB,
        {"bf16": 2500 * TB, "fp8": 5000 * TB, "fp4": 10000 * TB},
        1650, 6.50, "nvlink5", "ib-xdr", scale_up_size=72,
        sources=(
            "NVIDIA GB200 NVL72 datasheet: 72 Blackwell GPUs, 13.4 TB HBM3e (186 GB each), 576 TB/s (8 TB/s "
            "each), FP4 1,440 / FP8 720 / FP16 360 PFLOPS with sparsity (half dense), NVLink 5 130 TB/s in "
            "one 72-GPU domain",
            "Power: ~120 kW per NVL72 rack / 72 (GPU, its share of Grace CPUs and NVLink switches; assumption)",
            "Price: assumption, override with --price",
        ),
        aliases=("gb200-nvl72", "nvl72"),
    ),
    Hardware(
        "mi325x", "AMD Instinct MI325X", "mi300", 256 * GB, 6 * TB,
        {"bf16": 1307 * TB, "fp8": 2615 * TB},
        1000, 3.00, "infinity-fabric", "ib-ndr",
        sources=(
            "AMD Instinct MI325X datasheet: 256 GB HBM3E, 6 TB/s, FP16/BF16 1,307.4 and FP8 2,614.9 TFLOPS "
            "dense (the MI300X's CDNA 3 compute), 1,000 W, Infinity Fabric 896 GB/s",
            "Price: assumption, override with --price",
        ),
    ),
    Hardware(
        "sn40l", "SambaNova SN40L RDU (one socket)", "rdu", 64 * GB, 2 * TB,
        {"bf16": 638 * TB},
        600, 3.00, "samba-rdu", "efa-instance", scale_up_size=16,
        sources=(
            "SambaNova SN40L (Hot Chips 2024; launch 19 Sep 2023): 638 BF16 TFLOPS per socket, 520 MB on-chip "
            "SRAM, 64 GB HBM3 and up to 1.5 TB DDR5 per socket, 16 sockets per SambaRack SN40L-16",
            "HBM bandwidth, power and price: not published in the sources found; 2 TB/s, 600 W and $3/h are "
            "assumptions (override --price). The DDR tier is not modelled: weights and KV must fit the HBM",
        ),
        aliases=("sambanova", "samba"),
    ),
    Hardware(
        "tpu-v5e", "Google TPU v5e", "tpu", 16 * GB, 0.819 * TB,
        {"bf16": 197 * TB, "fp8": 394 * TB},
        200, 1.20, "ici-v5e", "ici-v5e", scale_up_size=256,
        sources=(
            "Google Cloud TPU v5e documentation: 16 GB HBM2, 819 GB/s, 197 TFLOPS BF16, 394 TOPS INT8, ICI "
            "1,600 Gbps, pods of 256 chips",
            "Power: not published; ~200 W assumed. Price: Cloud TPU v5e on-demand $1.20/chip-hour",
        ),
        aliases=("v5e",),
    ),
    Hardware(
        "local-cpu", "this machine's CPU (calibrated from the real engine)", "cpu", 2 * GB, 20 * GB,
        {"bf16": 0.2 * TB, "fp32": 0.1 * TB},
        65, 0.10, "tcp-loopback", "tcp-loopback", scale_up_size=1, memory_usable=1.0,
        sources=(
            "Step times fitted by `splitserve simulate calibrate` from the real engine on this machine "
            "(splitserve/sim/data/local_cpu.json); memory = the engine's default 2 GB CPU KV cache",
            "Power and price: assumptions",
        ),
        aliases=("cpu", "local"),
    ),
]

HARDWARE: dict[str, Hardware] = {h.name: h for h in _CATALOG}
_ALIASES: dict[str, str] = {a: h.name for h in _CATALOG for a in h.aliases}


def get_hardware(name: str, *, price: float | None = None) -> Hardware:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; `splitserve hardware` lists {', '.join(HARDWARE)}")
    hw = HARDWARE[key]
    if price is not None:
        hw = replace(hw, price_per_hour=price)
    return hw


def parse_hardware_arg(text: str) -> tuple[Hardware, int | None]:
    """`h100`, `h100:8` -> (hardware, units or None)."""
    name, _, count = text.partition(":")
    hw = get_hardware(name)
    if not count:
        return hw, None
    try:
        n = int(count)
    except ValueError:
        raise ValueError(f"bad unit count in {text!r}") from None
    if n < 1:
        raise ValueError(f"unit count must be >= 1 in {text!r}")
    return hw, n


def get_link(text: str) -> Link:
    """A catalog link name, or a bandwidth in GB/s (`50`, `50GBps`)."""
    key = text.strip().lower()
    if key in LINKS:
        return LINKS[key]
    num = key.removesuffix("gbps").removesuffix("gb/s")
    try:
        bw = float(num)
    except ValueError:
        raise ValueError(f"unknown link {text!r}; use one of {', '.join(LINKS)} or a bandwidth in GB/s") from None
    if bw <= 0:
        raise ValueError("link bandwidth must be > 0")
    return Link(f"{bw:g}GBps", bw * GB, 10e-6, "user-given bandwidth; 10 us latency assumed")
