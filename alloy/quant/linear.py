"""QuantLinear: y = x @ W.T + b with W kept as GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K) in memory.

Three paths, same result up to the activation's 8-bit rounding (kernel) or fp32 rounding (rest):
- few rows (decode: batch x new tokens <= GEMV_MAX_ROWS = 32): quant.c's integer-dot GEMV, which
  quantizes x to int8 per 32 inputs (llama.cpp's scheme) and streams the blocks once;
- many rows (prefill): dequantize a tile of weight rows at a time to fp32 (1-16 MiB, larger with
  more rows) and run PyTorch's GEMM on them — or, on a machine where the integer-dot kernel
  measured faster at that many rows (`kernel_rows`: an AMD EPYC, where PyTorch's fp32 GEMM is half
  the Xeon's), the kernel again;
- no compiled kernels (no compiler, no AVX2, ALLOY_CPU_KERNELS=0), or blocks on a GPU: the same
  tiles, dequantized by PyTorch (alloy.quant.dequantize), with x in fp32 — exact weights, fp32
  arithmetic. The kernels read host memory only, so a layer moved off the CPU drops them and
  holds its blocks in GGUF's own layout there (`_apply`); on a GPU the tiles are large
  (DEVICE_TILE_BYTES), each layer a few launches.

A frozen base under training (QLoRA: `exact=True`) always takes the tile path, which autograd
differentiates through `x` by dequantizing the tiles again in the backward (dx = dy W): the
blocks are all it keeps, never a whole fp32 copy of the weight.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch
from torch import nn

from alloy import kernels, quant
from alloy.errors import ConfigError
from alloy.kernels import quant as kernel_quant

# Up to this many rows the integer-dot kernel wins: measured on one core of the AVX-512 Xeon at
# 8192 x 2048 Q8_0, it took 0.45 ms per row where dequantize + GEMM took 6 ms at 8 rows, 21 ms at
# 32 and 52 ms at 128 (the kernel: 57 ms); 32 leaves margin for a faster GEMM elsewhere.
GEMV_MAX_ROWS = 32
# Past GEMV_MAX_ROWS the faster path depends on the machine: on the Xeon above, PyTorch's fp32
# GEMM (two 512-bit FMAs a cycle) won from ~128 rows; on an AMD EPYC (Zen 4, AVX-512 at one FMA a
# cycle), the kernel was 1.3-2.2x faster than dequantize + GEMM even at 512 rows (Q8_0, Q4_0, Q4_K;
# 768-2304 wide). So each machine measures it once (`kernel_rows`), per format and thread count,
# and keeps the answer in the kernel cache, where every later process (and every rank of a job)
# reads the same one. ALLOY_QUANT_KERNEL_ROWS=N sets it instead.
CROSSOVER_ROWS = (128, 512)  # the row counts measured; winning at the last means every count
CROSSOVER_VERSION = 1
# fp32 bytes of weight dequantized at once on the GEMM path: TILE_BYTES_PER_ROW per
# activation row, within [MIN_TILE_BYTES, MAX_TILE_BYTES]. A small tile stays in L2 for its GEMM (1 MiB
# was 2-6x faster than 32 MiB at 8-32 rows), but every tile's GEMM reads and packs all of x again,
# which with many rows costs more than the tile's cache misses. Measured on the AVX-512 Xeon, 2
# threads, the ~98M Llama's four matrices at Q4_K (per layer; their fp32 GEMMs alone in brackets):
# 64 rows 5.3 ms at 1 MiB, 5.1 at 2, 5.3 at 4 (4.6); 128 rows 7.8, 7.4, 7.1 at 4, 7.2 at 8 (7.0);
# 512 rows 25.7 at 1 MiB, 25.0 at 4, 24.2 at 8, 23.8 at 16 (23.2). A large matrix (an 8B
# model's head) still never exists whole in fp32.
TILE_BYTES_PER_ROW = 32 << 10
MIN_TILE_BYTES, MAX_TILE_BYTES = 1 << 20, 16 << 20
# The exact (training) path dequantizes into one scratch buffer of this many fp32 bytes, reused by
# every layer: tiles allocated and freed between a forward's activations fragment glibc's heap
# (measured on a 98M QLoRA run: peak RSS 1140 MiB where the live tensors peaked near 650), and
# large tiles make few, wide GEMMs (the backward's dy @ W tile by tile).
EXACT_TILE_BYTES = 16 << 20
# On a GPU: fp32 bytes of weight dequantized at once. Each tile is ~10 kernel launches whatever its
# size, and GPU memory is not a cache to stay inside: large tiles, few launches; a model's largest
# matrices (an 8B model's head: 2 GB in fp32) still never exist whole.
DEVICE_TILE_BYTES = 256 << 20
_scratch: list[torch.Tensor] = []


class _Blocks(nn.Module):
    """A module over GGUF blocks (`self.blocks`) whose compiled kernels read host memory: moved off
    the CPU (`.to("cuda")`), it drops them and holds GGUF's own layout (`_leave_kernels_off_host`)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not (on_host(self.blocks) or self.blocks.is_meta):
            self._leave_kernels_off_host()
        return self

    def _gguf_layout_here(self, layout: str) -> None:
        """`self.blocks`, held in kernel layout `layout`, back in its format's GGUF layout on its
        device (unpacked through the host once)."""
        if layout != self.fmt:
            self.blocks = kernel_quant.REPACK[layout][1](self.blocks.cpu()).to(self.blocks.device)


class QuantLinear(_Blocks):
    """A linear layer over GGUF blocks `blocks` uint8 [out, in / block * type_size]; fp32 in and out."""

    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None = None,
                 *, isa: str | None = "auto", exact: bool = False, laid_out: bool = False):
        """`laid_out`: `blocks` are already in the layout this layer's kernel reads (`kernel_layout`),
        as `from_weight` quantizes them; otherwise they are GGUF's, interleaved here where needed."""
        super().__init__()
        spec = quant.get_format(fmt)
        quant.check_width(spec, in_features)
        if blocks.dtype != torch.uint8 or blocks.shape[1] != in_features // spec.block_size * spec.type_size:
            raise ConfigError(f"{fmt} blocks for {in_features} inputs must be uint8 [out, "
                              f"{in_features // spec.block_size * spec.type_size}], got {blocks.dtype} {tuple(blocks.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self.fmt, self.in_features, self.out_features = fmt, in_features, blocks.shape[0]
        # None: the PyTorch fallback. Fixed at construction, so a test can pin every variant; blocks
        # off the CPU never take the kernels.
        self.isa = None if not on_host(blocks) else kernel_quant.best_isa() if isa == "auto" else isa
        # exact: every row through the dequantized tiles in x's precision (at least fp32), never the
        # int8-activation GEMV, and differentiable in x: a frozen base that a backward passes through
        self.exact = exact
        # The layout the GEMV reads: GGUF's, or (where this ISA has a kernel for it) the same bytes
        # with rows interleaved — `blocks` then holds that, and tiles are unpacked before decoding.
        self.kernel_fmt, self.group_rows = self.kernel_layout(fmt, self.out_features, self.isa, exact)
        if self.kernel_fmt != fmt and not laid_out:
            blocks = kernel_quant.REPACK[self.kernel_fmt][0](blocks.contiguous())
        self.register_buffer("blocks", blocks.contiguous())

    def _leave_kernels_off_host(self) -> None:
        """Blocks off the CPU: PyTorch's decode of GGUF's layout (the kernels' interleaved layouts
        are theirs)."""
        self._gguf_layout_here(self.kernel_fmt)
        self.isa, self.kernel_fmt, self.group_rows = None, self.fmt, 1

    @staticmethod
    def kernel_layout(fmt: str, out_features: int, isa: str | None, exact: bool = False) -> tuple[str, int]:
        """(the layout the blocks are held in, rows per interleaved group) for such a layer."""
        interleaved = kernel_quant.INTERLEAVED.get(fmt)
        if interleaved and isa in interleaved[1] and not exact and out_features % interleaved[2] == 0:
            return interleaved[0], interleaved[2]
        return fmt, 1

    @classmethod
    def from_weight(cls, weight, bias: torch.Tensor | None, fmt: str, *, isa: str | None = "auto",
                    name: str = "weight", exact: bool = False) -> "QuantLinear":
        """`weight` [out, in]: a tensor, or rows still on disk (as alloy.quant.quantize takes)."""
        quant.check_width(quant.get_format(fmt), weight.shape[1], name)
        isa = kernel_quant.best_isa() if isa == "auto" else isa
        layout, _ = cls.kernel_layout(fmt, weight.shape[0], isa, exact)
        # quantized straight into the kernel's layout: no second, repacked copy of the blocks
        return cls(quant.quantize(weight, fmt, layout=layout), fmt, weight.shape[1], bias, isa=isa, exact=exact,
                   laid_out=True)

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 [out, in]: the exact values the blocks encode."""
        return self._tile(0, self.out_features)

    def gguf_blocks(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the weight in GGUF's layout (multiples of group_rows)."""
        rows = self.blocks[start:stop]
        return rows if self.kernel_fmt == self.fmt else kernel_quant.REPACK[self.kernel_fmt][1](rows)

    def _tile(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of W in fp32; with the kernels, into `out` (fp32 [>= stop - start, in]) if given."""
        if self.isa is None:
            return quant.dequantize(self.gguf_blocks(start, stop), self.fmt)
        # the C dequantizer reads the kernel's own layout (whole groups of rows)
        out = None if out is None else out[:stop - start]
        return kernel_quant.dequantize(self.blocks[start:stop], self.kernel_fmt, self.in_features, self.isa, out=out)

    def _tile_rows(self, x_rows: int = 0) -> int:
        """Weight rows per tile for a product with `x_rows` activation rows."""
        tile_bytes = min(max(x_rows * TILE_BYTES_PER_ROW, MIN_TILE_BYTES), MAX_TILE_BYTES)
        if not on_host(self.blocks):
            tile_bytes = DEVICE_TILE_BYTES
        rows = max(1, (EXACT_TILE_BYTES if self.exact else tile_bytes) // (4 * self.in_features))
        return max(self.group_rows, rows // self.group_rows * self.group_rows)

    def _exact_tile(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of W in fp32, in the shared scratch buffer when the kernels are here."""
        if self.isa is None:
            return self._tile(start, stop)
        need = (stop - start) * self.in_features
        if not _scratch or _scratch[0].numel() < need:
            _scratch[:] = [torch.empty(max(need, EXACT_TILE_BYTES // 4), dtype=torch.float32)]
        out = _scratch[0][:need].view(stop - start, self.in_features)
        return kernel_quant.dequantize(self.blocks[start:stop], self.fmt, self.in_features, self.isa, out=out)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [rows, in] @ W.T over dequantized tiles, in x2's dtype; no bias, no autograd."""
        y = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        step = self._tile_rows(x2.shape[0])
        # Every tile of this call is dequantized into one buffer (one allocation per call, not per
        # tile; per call, not shared, as pipeline stages run layers on several threads at once).
        buffer = None if self.exact or self.isa is None else torch.empty(min(step, self.out_features), self.in_features)
        # Each tile's product goes straight into its columns of y (the GEMM writes with y's row
        # stride): no product to allocate, copy and free. out= refuses inputs that autograd
        # tracks; only a caller outside the exact path's Function would pass one.
        direct = not (x2.requires_grad and torch.is_grad_enabled())
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            tile = self._exact_tile(start, stop) if self.exact else self._tile(start, stop, buffer)
            tile = tile.to(x2.dtype).t()
            if direct:
                torch.mm(x2, tile, out=y[:, start:stop])
            else:
                y[:, start:stop] = x2 @ tile
        return y

    def matmul_t(self, dy: torch.Tensor) -> torch.Tensor:
        """dy [rows, out] @ W over the same tiles: the input gradient of `matmul`."""
        step = self._tile_rows()
        if step >= self.out_features:
            return torch.mm(dy, self._exact_tile(0, self.out_features).to(dy.dtype))
        dx = torch.zeros(dy.shape[0], self.in_features, dtype=dy.dtype, device=dy.device)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            dx.addmm_(dy[:, start:stop], self._exact_tile(start, stop).to(dy.dtype))
        return dx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.exact:
            # in x's precision as an nn.Linear of that dtype would be (bf16: the CPU's fast matmul),
            # except fp16, whose CPU matmul is slow: fp32 then
            dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
            x2 = x.reshape(rows, self.in_features).to(dtype)
            y = _FrozenMatmul.apply(x2, self)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        x2 = x.reshape(rows, self.in_features).to(torch.float32).contiguous()
        if self.isa is not None and (rows <= GEMV_MAX_ROWS or rows <= kernel_rows(self.isa, self.fmt)):
            y = kernel_quant.gemv(x2, self.blocks, self.kernel_fmt, self.out_features, self.bias, self.isa)
        else:
            y = self.matmul(x2)
            if self.bias is not None:
                y += self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights {self.fmt}, "
                f"kernels {self.isa or 'pytorch'}")


class _FrozenMatmul(torch.autograd.Function):
    """x @ W.T with W a QuantLinear's blocks: the backward dequantizes the tiles again for dy @ W.
    Autograd would otherwise keep every dequantized fp32 tile of the forward alive until the
    backward, a whole fp32 copy of the weight per layer (what QLoRA exists to avoid)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")  # the backward runs under the forward's autocast state
    def forward(ctx, x2: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x2.contiguous())

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, dy: torch.Tensor):
        return ctx.layer.matmul_t(dy.contiguous()), None


class QuantEmbedding(_Blocks):
    """Token embedding rows kept as GGUF blocks [vocab, row_bytes]; a lookup decodes only the rows
    asked for. Can share its blocks with a tied head's QuantLinear (one copy of the table)."""

    def __init__(self, blocks: torch.Tensor, fmt: str, dim: int, *, isa: str | None = "auto",
                 layout: str | None = None):
        super().__init__()
        self.register_buffer("blocks", blocks)
        self.fmt, self.dim = fmt, dim
        self.isa = kernel_quant.best_isa() if isa == "auto" else isa
        # a tied head's interleaved layout (QuantLinear.kernel_fmt), shared: rows are found in their group
        self.layout = layout or fmt
        if not (on_host(blocks) or blocks.is_meta):
            self._leave_kernels_off_host()

    def _leave_kernels_off_host(self) -> None:
        """As QuantLinear's: off the CPU, GGUF's layout and PyTorch's decode."""
        self._gguf_layout_here(self.layout)
        self.isa, self.layout = None, self.fmt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if self.layout == self.fmt:
            rows = self.blocks[flat]
        else:
            group = kernel_quant.INTERLEAVED[self.fmt][2]
            groups = self.blocks.view(self.blocks.shape[0] // group, -1)[flat // group]
            unpacked = kernel_quant.REPACK[self.layout][1](groups.view(-1, self.blocks.shape[1]))
            rows = unpacked.view(len(flat), group, -1)[torch.arange(len(flat)), flat % group]
        if self.isa is None:
            values = quant.dequantize(rows, self.fmt)
        else:
            values = kernel_quant.dequantize(rows, self.fmt, self.dim, self.isa)
        return values.view(*ids.shape, self.dim)

    def extra_repr(self) -> str:
        return f"{self.blocks.shape[0]} x {self.dim}, weights {self.fmt}"


def on_host(blocks: torch.Tensor) -> bool:
    """Whether the compiled kernels can read `blocks` (host memory: the CPU's)."""
    return blocks.device.type == "cpu"


def kernel_rows(isa: str, fmt: str) -> float:
    """Up to how many rows the integer-dot kernel takes a product of `fmt` on this machine (at least
    GEMV_MAX_ROWS; inf where it won at every count measured): ALLOY_QUANT_KERNEL_ROWS, else the
    answer measured once per machine, format and thread count (`_measured_kernel_rows`)."""
    forced = os.environ.get("ALLOY_QUANT_KERNEL_ROWS")
    if forced:
        try:
            return max(GEMV_MAX_ROWS, float(forced))
        except ValueError:
            raise ConfigError(f"ALLOY_QUANT_KERNEL_ROWS={forced!r}: give a number of rows (or inf)") from None
    return _measured_kernel_rows(isa, fmt, torch.get_num_threads())


@functools.cache
def _measured_kernel_rows(isa: str, fmt: str, threads: int) -> float:
    """Time the kernel against dequantize + GEMM on a 1024 x 1024 layer of `fmt` (in the layout its
    kernel reads at that width) at CROSSOVER_ROWS rows: the largest count it wins at, every count
    before it won too. Measured once per machine, library and thread count (kernels.measured_once)."""
    def measure() -> dict:
        limit, timings = _crossover(isa, fmt)
        return {"kernel_rows": limit, "format": fmt, "threads": threads, "timings": timings}

    key = f"{CROSSOVER_VERSION} {isa} {fmt} {threads} {hashlib.sha256(kernels._source_bytes(kernel_quant.SOURCE)).hexdigest()}"
    return float(kernels.measured_once("quant-rows", key, measure)["kernel_rows"])


def _crossover(isa: str, fmt: str) -> tuple[float, dict]:
    """(the rows limit, the timings it came from) on a 1024 x 1024 layer of `fmt`."""
    g = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_weight(torch.randn(1024, 1024, generator=g) * 0.05, None, fmt, isa=isa)
    limit, timings = float(GEMV_MAX_ROWS), {}
    for rows in CROSSOVER_ROWS:
        x = torch.randn(rows, 1024, generator=g)
        kernel_s = kernels.best_of(lambda: kernel_quant.gemv(x, layer.blocks, layer.kernel_fmt, 1024, None, isa))
        gemm_s = kernels.best_of(lambda: layer.matmul(x))
        timings[rows] = {"kernel_s": kernel_s, "gemm_s": gemm_s}
        if kernel_s > gemm_s:
            break
        limit = float("inf") if rows == CROSSOVER_ROWS[-1] else float(rows)
    return limit, timings
