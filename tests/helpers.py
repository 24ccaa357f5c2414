"""Error measures and test inputs shared by the tests."""

import torch

from mild_kernels._runtime import count_host_reads  # noqa: F401  (the step profiler counts reads the same way)

# Relative-error bounds ||out - ref|| / ||ref|| against a float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the entries where ref is finite; inf if the patterns differ."""
    out, ref = out.double().cpu(), ref.double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), finite) or not torch.equal(out[~finite], ref[~finite]):
        return float("inf")
    denom = ref[finite].norm().item()
    diff = (out[finite] - ref[finite]).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not out.isnan().any(), f"{name}: NaN in output"
    err = rel_err(out, ref)
    bound = TOLERANCE[dtype] * factor
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.1e} ({dtype})"


def write_png_header(path, width: int, height: int) -> None:
    """A PNG that claims width x height pixels and holds almost none: PIL's decompression-bomb guard."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
