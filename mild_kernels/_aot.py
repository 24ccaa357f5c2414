"""Ahead-of-time compilation of recorded Triton launches, and what their SASS says, no GPU.

A launch recorded by :func:`mild_kernels._runtime.record_launches` (kernel, grid,
keyword arguments, warps, stages) is compiled here exactly as the JIT would compile
it on a GPU of the given architecture:

- :func:`jit_signature` specialises the arguments with Triton's own launch-time binder
  (ints equal to 1 become constexprs, 16-divisible ints and 16-byte-aligned pointers
  get ``tt.divisibility``), so the cubin is the one a real launch would run;
- :func:`compile_launch` compiles it for ``sm_<arch>``;
- :func:`resource_usage`, :func:`ctas_per_sm` read registers, spills, shared memory and
  the occupancy they allow;
- :func:`sass` and :func:`loops` disassemble the cubin and count the instructions of its
  innermost loops by family (wgmma, mma.sync, MUFU.EX2, ...), a static measure of the
  work per loop iteration that needs no GPU to compare kernels.

Run ``python -m mild_kernels._aot`` for a self-check of the specialisation rules.
Interpreted kernels cannot be compiled: TRITON_INTERPRET must be unset before triton
is imported.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import torch

WARP_SIZE = 32

# ---------------------------------------------------------------- specialisation
_TORCH_TO_TRITON = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, WARP_SIZE)


def _binder_signature(kernel, kwargs: dict, arch: int):
    """Triton's own launch path (3.6 to 3.9): the binder, then JITFunction._pack_args."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target(arch))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, {}, bound, specialization, options)
    return signature, constexprs, attrs


def _manual_signature(kernel, kwargs: dict):
    """The binder's rules written out, for Triton versions whose internals differ.

    Mirrors triton's specialize_impl: constexpr parameters and None are constants, an int
    equal to 1 is a constant, an int divisible by 16 and a pointer aligned to 16 bytes get
    the divisibility hint, unless the parameter is marked do_not_specialize.
    """
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = kwargs[name] if name in kwargs else param.default
        hints = []
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + ("k" if param.is_const else "") + _TORCH_TO_TRITON[value.dtype]
            if not param.do_not_specialize_on_alignment and value.data_ptr() % 16 == 0:
                hints = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if not param.do_not_specialize and value == 1:
                signature[name] = "constexpr"
                constexprs[(index,)] = value
                continue
            if -2**31 <= value < 2**31:
                signature[name] = "i32"
            elif 0 <= value < 2**64:
                signature[name] = "u64" if value >= 2**63 else "i64"
            else:
                raise ValueError(f"{kernel.__name__}.{name}: {value} does not fit 64 bits")
            if not param.do_not_specialize and value % 16 == 0:
                hints = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{name}: cannot type {type(value).__name__}")
        if hints:
            attrs[(index,)] = hints
    return signature, constexprs, attrs


def jit_signature(kernel, kwargs: dict, arch: int = 90) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``triton.compiler.ASTSource``, as a launch would specialise.

    Uses Triton's binder where its internal names are the ones this was written against
    (triton 3.6 to 3.9), and the same rules written out otherwise.
    """
    try:
        return _binder_signature(kernel, kwargs, arch)
    except (ImportError, AttributeError, TypeError):
        return _manual_signature(kernel, kwargs)


def compile_launch(launch, arch: int = 90):
    """The compiled kernel (``triton.compiler.CompiledKernel``) of a RecordedLaunch for sm_<arch>."""
    import triton
    from triton.compiler import ASTSource

    kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in launch.kwargs.items()}
    signature, constexprs, attrs = jit_signature(launch.kernel, kwargs, arch)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    options = (launch.options_for(arch) if hasattr(launch, "options_for")
               else {"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    return triton.compile(source, target=_target(arch), options=options)


# ---------------------------------------------------------------- resources
def _cuobjdump(args: list[str], cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), *args, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> dict:
    """{"reg", "shared", "local", "stack"} of a compiled kernel; local and stack are spill bytes a thread.

    Shared memory is the larger of the cubin's static figure and Triton's own, since
    Triton allocates its buffers dynamically and cuobjdump counts only static ones.
    """
    text = _cuobjdump(["--dump-resource-usage"], compiled.asm["cubin"])
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    usage = {"reg": 0, "shared": 0, "local": 0, "stack": 0, **usage}
    usage["shared"] = max(usage["shared"], compiled.metadata.shared)
    return usage


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM limits, as CUDA's occupancy calculator (cuda_occupancy.h) applies them."""

    registers: int = 65536           # 32-bit registers per SM
    sub_partitions: int = 4          # registers are split among four schedulers' register files
    register_granularity: int = 256  # registers are allocated per warp in units of this
    max_registers_per_thread: int = 255
    shared_per_sm: int = 228 * 1024
    shared_per_block: int = 227 * 1024
    shared_reserved_per_block: int = 1024  # the driver's per-block reservation
    shared_granularity: int = 128
    warps: int = 64
    blocks: int = 32


SM_LIMITS = {
    90: SmLimits(),
    80: SmLimits(shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def ctas_per_sm(regs: int, shared_bytes: int, num_warps: int, arch: int = 90) -> int:
    """Resident CTAs per SM allowed by registers, shared memory, warps and the block limit (0: cannot launch)."""
    limits = SM_LIMITS[arch]
    if regs > limits.max_registers_per_thread or shared_bytes > limits.shared_per_block:
        return 0
    # A warp's registers live in one sub-partition: warps fit per sub-partition, not per SM.
    regs_per_warp = _round_up(max(regs, 1) * WARP_SIZE, limits.register_granularity)
    warps_by_regs = (limits.registers // limits.sub_partitions // regs_per_warp) * limits.sub_partitions
    by_regs = warps_by_regs // num_warps
    shared_per_block = _round_up(shared_bytes, limits.shared_granularity) + limits.shared_reserved_per_block
    by_shared = limits.shared_per_sm // shared_per_block
    by_warps = limits.warps // num_warps
    return min(by_regs, by_shared, by_warps, limits.blocks)


# ---------------------------------------------------------------- SASS
def sass(compiled) -> str:
    """The cubin's SASS as ``cuobjdump -sass`` prints it."""
    return _cuobjdump(["-sass"], compiled.asm["cubin"])


# Opcode families, by the opcode's base name (before its first dot); MUFU.EX2 and the
# uniform-datapath (U-prefixed) integer ops are sorted in _family.
_FAMILIES = {
    "wgmma": {"HGMMA", "IGMMA", "QGMMA", "BGMMA"},
    "mma_sync": {"HMMA", "IMMA", "DMMA", "BMMA", "QMMA"},
    "fp32": {"FFMA", "FADD", "FMUL", "FMNMX", "FMNMX3", "FSEL", "FSETP", "FSET", "FCHK", "FSWZADD", "FRND",
             "FADD2", "FFMA2", "FMUL2"},
    "fp16x2": {"HADD2", "HFMA2", "HMUL2", "HMNMX2", "HSET2", "HSETP2"},
    "convert": {"F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "I2I", "I2IP"},
    "int/address": {"IMAD", "IMUL", "IADD3", "IADD", "VIADD", "VIADDMNMX", "LEA", "SHF", "SHL", "SHR", "LOP3",
                    "LOP", "ISETP", "IABS", "SEL", "PRMT", "MOV", "CS2R", "S2R", "S2UR", "R2UR", "IMNMX",
                    "VIMNMX", "VIMNMX3", "SGXT", "FLO", "POPC", "BREV", "PLOP3", "P2R", "R2P", "BMSK", "IDP",
                    "IDP4A", "LDC", "ULDC", "VOTE", "VOTEU"},
    "global_load": {"LDG", "LDGSTS", "LD", "UTMALDG", "UBLKCP", "UTMAPF", "LDGMC"},
    "global_store": {"STG", "ST", "UTMASTG", "UBLKRED", "UTMAREDG"},
    "atomic": {"RED", "ATOM", "ATOMG", "ATOMS", "REDG", "REDAS"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "LDSU"},
    "local": {"LDL", "STL"},
    "barrier/sync": {"BAR", "MEMBAR", "WARPSYNC", "SYNCS", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "FENCE", "ERRBAR",
                     "CCTL", "ARRIVES", "NANOSLEEP", "UCGABAR_ARV", "UCGABAR_WAIT", "CGAERRBAR", "ELECT"},
    "shuffle": {"SHFL", "REDUX", "MATCH"},
    "control": {"BRA", "BRX", "BRXU", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BPT", "KILL",
                "YIELD", "BMOV", "ACQBULK", "WARPSYNC.ALL"},
}
_FAMILY_OF = {opcode: family for family, opcodes in _FAMILIES.items() for opcode in opcodes}
FAMILIES = ("wgmma", "mma_sync", "mufu_ex2", "mufu", *[f for f in _FAMILIES if f not in ("wgmma", "mma_sync")],
            "other")


def _family(opcode: str) -> str:
    base = opcode.split(".", 1)[0]
    if base == "MUFU":
        return "mufu_ex2" if opcode.startswith("MUFU.EX2") else "mufu"
    if base in _FAMILY_OF:
        return _FAMILY_OF[base]
    if base.startswith("U") and base[1:] in _FAMILY_OF:  # UIADD3, ULOP3, USHF...: the uniform datapath
        return _FAMILY_OF[base[1:]]
    return "other"


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str     # with its modifiers, e.g. "MUFU.EX2", "HGMMA.64x64x16.F32.BF16"
    operands: str

    @property
    def family(self) -> str:
        return _family(self.opcode)


# "/*0d30*/   @!P0 BRA 0x2180 ;   /* 0x... */": address, optional predicate, opcode, operands.
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*\{?\s*(@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[\w.]+)?)"
                          r"\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L\w*|[A-Za-z_$][\w$.]*):\s*$")
_BRANCH_TARGET = re.compile(r"`\((\.?[\w$.]+)\)|\b0x([0-9a-fA-F]+)\b")


def parse_sass(sass_text: str) -> list[list[Instruction]]:
    """The instructions of each function in ``sass_text``, in address order (encoding lines dropped)."""
    functions, current = [], None
    for line in sass_text.splitlines():
        if "Function :" in line:
            current = []
            functions.append(current)
            continue
        match = _INSTRUCTION.match(line)
        if match:
            if current is None:  # nvdisasm-style text without a "Function :" header
                current = []
                functions.append(current)
            address, predicate, opcode, operands = match.groups()
            current.append(Instruction(int(address, 16), (predicate or "").strip(), opcode, operands.strip()))
    return functions


def _label_addresses(sass_text: str) -> dict[str, int]:
    """Label -> address of the instruction that follows it (nvdisasm-style listings print labels)."""
    labels, pending = {}, []
    for line in sass_text.splitlines():
        match = _LABEL.match(line)
        if match:
            pending.append(match[1])
            continue
        match = _INSTRUCTION.match(line)
        if match:
            for label in pending:
                labels[label] = int(match[1], 16)
            pending = []
    return labels


def _never_runs(ins: Instruction) -> bool:
    """NOPs, and instructions predicated on @!PT (ptxas pads barriers with ``@!PT LDS RZ, [RZ]``)."""
    return ins.opcode.split(".", 1)[0] == "NOP" or ins.predicate in ("@!PT", "@!UPT")


_HGMMA_SHAPE = re.compile(r"^[HIQB]GMMA\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = re.compile(r"^[HIDB]MMA\.(16|8)(8)(\d+)")  # HMMA.16816: m16 n8 k16; HMMA.1688: m16 n8 k8


def mma_macs(opcode: str) -> tuple[int, bool]:
    """(multiply-adds of one MMA instruction, whether a warpgroup issues it together) or (0, False).

    A wgmma (HGMMA.64x64x16) is one warpgroup's 64x64x16 product, issued by each of its four
    warps; an mma.sync (HMMA.16816) is one warp's m16 n8 k16.
    """
    match = _HGMMA_SHAPE.match(opcode)
    if match:
        m, n, k = map(int, match.groups())
        return m * n * k, True
    match = _HMMA_SHAPE.match(opcode)
    if match:
        m, n, k = map(int, match.groups())
        return m * n * k, False
    return 0, False


@dataclasses.dataclass
class Loop:
    """An innermost loop: the instructions from a backward branch's target to the branch."""

    start: int
    end: int
    instructions: int  # per iteration; NOPs and never-run (@!PT) instructions are not counted
    families: dict     # family -> count per iteration, over FAMILIES (zeros included)
    opcodes: dict      # full opcode -> count per iteration

    def tensor_macs(self, num_warps: int) -> int:
        """The multiply-adds the CTA's tensor cores do per iteration (all warps together)."""
        total = 0
        for opcode, count in self.opcodes.items():
            macs, per_warpgroup = mma_macs(opcode)
            total += count * macs * (num_warps // 4 if per_warpgroup else num_warps)
        return total

    @property
    def is_main(self) -> bool:
        """A loop that runs tensor-core MMAs: the kernel's steady state."""
        return self.families["wgmma"] + self.families["mma_sync"] > 0


def loops(sass_text: str) -> list[Loop]:
    """The innermost loops of every function in ``sass_text``, in address order.

    A loop is a backward branch (a BRA to an earlier address; the trailing BRA to itself
    is a trap, not a loop) and the instructions from its target to it; branches back to
    one target are one loop. Loops that contain another are dropped, so each loop's
    counts are one iteration of its steady state, any forward-branching code inside it
    counted once: a static, not a dynamic, count. NOPs and @!PT instructions never run
    and are not counted.
    """
    labels = _label_addresses(sass_text)
    found = []
    for body in parse_sass(sass_text):
        ends: dict[int, int] = {}  # target -> last branch back to it
        for ins in body:
            if ins.opcode.split(".", 1)[0] != "BRA" or _never_runs(ins):
                continue
            match = _BRANCH_TARGET.search(ins.operands)
            if not match:
                continue  # an indirect or register branch
            target = labels.get(match[1]) if match[1] else int(match[2], 16)
            if target is not None and target < ins.address:
                ends[target] = max(ends.get(target, 0), ins.address)
        spans = sorted(ends.items())
        innermost = [(s, e) for s, e in spans
                     if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in spans)]
        for start, end in innermost:
            inside = [ins for ins in body if start <= ins.address <= end and not _never_runs(ins)]
            families = dict.fromkeys(FAMILIES, 0)
            families.update(collections.Counter(ins.family for ins in inside))
            opcodes = dict(collections.Counter(ins.opcode for ins in inside).most_common())
            found.append(Loop(start, end, len(inside), families, opcodes))
    return found


def main_loops(sass_text: str) -> list[Loop]:
    """The innermost loops that run tensor-core MMAs (HGMMA or HMMA)."""
    return [loop for loop in loops(sass_text) if loop.is_main]


# ---------------------------------------------------------------- self-check
def _self_check() -> None:
    """Triton's binder specialises as a launch would: 1 is a constant, 16-divisible ints get the hint."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, n_one, n_aligned, n_odd, flag, x, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32) + n_one + n_aligned + n_odd + flag + x)

    kwargs = dict(X=torch.empty(64), n_one=1, n_aligned=4096, n_odd=77, flag=True, x=0.5, BLOCK=32)
    try:
        signature, constexprs, attrs = _binder_signature(probe, kwargs, 90)
        path = "Triton's binder"
    except (ImportError, AttributeError, TypeError) as error:
        signature, constexprs, attrs = _manual_signature(probe, kwargs)
        path = f"the written-out rules (the binder failed: {error!r})"
    index = {name: (i,) for i, name in enumerate(probe.arg_names)}
    assert signature["n_one"] == "constexpr" and constexprs[index["n_one"]] == 1, (signature, constexprs)
    assert ["tt.divisibility", 16] in attrs.get(index["n_aligned"], []), attrs
    assert ["tt.divisibility", 16] in attrs.get(index["X"], []), attrs
    assert not attrs.get(index["n_odd"]) and signature["n_odd"] == "i32", (signature, attrs)
    # The fallback must agree with the binder (Triton lists empty attrs; the fallback omits them).
    assert _manual_signature(probe, kwargs) == (signature, constexprs, {k: v for k, v in attrs.items() if v}), \
        "the written-out rules drifted from Triton's binder"
    print(f"triton {triton.__version__}, via {path}: {signature}\n  constexprs {constexprs}\n  attrs {attrs}")


if __name__ == "__main__":
    _self_check()
