"""Memory a model will take once loaded, estimated from its GGUF header before it loads.

KV bytes = sum over attention layers of cells x n_head_kv x (key_dim + value_dim) x bytes per
element. This matched llama-server's own log lines exactly on a gemma3 model (full and
sliding-window layers). The estimate errs high where a detail is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_serve.models.model_info import ModelInfo

# Compute buffer and runtime overhead not in the file or the KV cache (measured 27-34 MiB on a
# 270M model; grows with width and vocabulary, so scale with the weights, floored).
_OVERHEAD_FLOOR = 64 * 1024 * 1024
_OVERHEAD_RATIO = 0.05
_UBATCH = 512
_F16 = 2.0


def _round_up(value: int, step: int = 256) -> int:
    return -(-value // step) * step


def _swa_layers(info: ModelInfo) -> list[bool]:
    """Which layers use a sliding window (True), from the header or the architecture's rule."""
    n = info.block_count
    if info.sliding_window <= 0:
        return [False] * n
    if info.sliding_window_pattern and len(info.sliding_window_pattern) >= n:
        return list(info.sliding_window_pattern[:n])
    if info.architecture.startswith("gemma3"):
        return [(i + 1) % 6 != 0 for i in range(n)]  # one global layer in six
    if info.architecture in ("gemma2", "gpt-oss", "cohere2"):
        return [i % 2 == 0 for i in range(n)]
    return [False] * n  # unknown: count as full layers (errs high)


def kv_cache_bytes(info: ModelInfo, ctx: int, parallel: int = 1,
                   bytes_per_elem: float = _F16, swa_full: bool = False) -> int:
    """KV cache of one loaded instance at context `ctx` (unified cache, llama-server's default).
    With `swa_full` (llama-server --swa-full) sliding-window layers keep every cell too."""
    if info.block_count <= 0:
        return 0
    head_dim = info.embedding_length // info.head_count if info.head_count else 0
    key_dim = info.key_length or head_dim
    value_dim = info.value_length or head_dim
    kv_heads = info.head_count_kv or [info.head_count]
    n_ctx = _round_up(max(ctx, 256))
    swa = [False] * info.block_count if swa_full else _swa_layers(info)
    swa_cells = _round_up(min(n_ctx, info.sliding_window * max(parallel, 1) + _UBATCH))
    total = 0.0
    for layer in range(info.block_count):
        heads = kv_heads[layer] if layer < len(kv_heads) else kv_heads[-1]
        if heads <= 0:
            continue  # recurrent layer: no per-token cache
        cells = swa_cells if swa[layer] else n_ctx
        total += cells * heads * (key_dim + value_dim) * bytes_per_elem
    return int(total)


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def estimate(info: ModelInfo, file_bytes: int, ctx: int, parallel: int = 1,
             mmproj_bytes: int = 0, swa_full: bool = False) -> Footprint:
    weights = file_bytes + mmproj_bytes
    overhead = max(_OVERHEAD_FLOOR, int(weights * _OVERHEAD_RATIO))
    return Footprint(weights, kv_cache_bytes(info, ctx, parallel, swa_full=swa_full), overhead)


def local_share(info: ModelInfo, full: Footprint, workers: int, mmproj_bytes: int = 0,
                local_gpu: bool = False) -> Footprint:
    """What stays on this machine of a model whose layers go to `workers` RPC workers
    (`full`: its whole footprint).

    llama-server offloads every layer (-ngl defaults to all, and --fit is off) and splits the
    layers, with their KV cache, over the devices by their free memory. On a host without a
    GPU the only devices are the workers: the CPU keeps the token embeddings (the input layer
    is never offloaded), the projector, and the compute and output buffers (the overhead).
    gemma-3-270m over two workers: 170 MiB of embeddings, 38.6 MiB CPU compute buffer, 4 MiB
    output buffer; the model server's RSS was 239 MiB against 325 MiB alone.
    A local GPU (Metal) is one more device, whose share follows its free memory against the
    workers', which are not known here: the layers and KV cache are counted as split evenly
    over the devices (high when the workers have more free memory than this machine, low
    when they have less). Without measured embeddings the whole footprint counts."""
    if not 0 < info.input_embedding_bytes <= full.weights - mmproj_bytes:
        return full
    kept = info.input_embedding_bytes + mmproj_bytes
    if not local_gpu:
        return Footprint(kept, 0, full.overhead)
    devices = 1 + max(workers, 1)
    return Footprint(kept + (full.weights - kept) // devices, full.kv_cache // devices,
                     full.overhead)


def largest_fitting_ctx(info: ModelInfo, file_bytes: int, wanted: int, budget: int,
                        parallel: int = 1, floor: int = 2048, swa_full: bool = False) -> int:
    """The biggest context (multiple of 256, at most `wanted`) whose footprint fits `budget`."""
    ctx = wanted
    while ctx > floor and estimate(info, file_bytes, ctx, parallel,
                                   swa_full=swa_full).total > budget:
        ctx = max(floor, _round_up(ctx // 2))
    return ctx


# --swa-full is turned on by itself (with KV_CACHE on) when its extra memory is at most this,
# or at most SWA_FULL_SHARE of the model's footprint: a restored conversation saves seconds to
# minutes of prompt processing, worth a small cost and not a large one.
SWA_FULL_FREE = 256 * 1024 * 1024
SWA_FULL_SHARE = 0.10


def swa_full_extra(info: ModelInfo, ctx: int, parallel: int = 1) -> int:
    """Bytes --swa-full adds to the KV cache (0 for a model without sliding-window layers)."""
    return (kv_cache_bytes(info, ctx, parallel, swa_full=True)
            - kv_cache_bytes(info, ctx, parallel))


def swa_full_is_cheap(info: ModelInfo, file_bytes: int, ctx: int, parallel: int = 1) -> bool:
    extra = swa_full_extra(info, ctx, parallel)
    base = estimate(info, file_bytes, ctx, parallel).total
    return 0 < extra <= max(SWA_FULL_FREE, int(base * SWA_FULL_SHARE))
