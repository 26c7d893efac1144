//! The token embedding's gather and its backward (`embedding.cu`).

use super::launch::{family, per_item, AsBuf, Family, Gpu};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result};

static KERNELS: Family = family!("ternlab_embedding", "embedding.cu");

/// `embed(const float* table, const unsigned* ids, T* out, long n, int e)`: out (n, e) =
/// rows `ids` (n, u32) of the f32 table (V, e), in out's dtype.
pub fn embed(gpu: &Gpu, table: &impl AsBuf, ids: &impl AsBuf, out: &impl AsBuf) -> Result<()> {
    let (table, ids, out) = (table.buf()?, ids.buf()?, out.buf()?);
    let (n, e) = (ids.n(), table.last());
    table.expect("embed: table", table.n(), DType::F32)?;
    ids.expect("embed: ids", n, DType::U32)?;
    out.expect("embed: out", n * e, out.dtype)?;
    gpu.kernel(&KERNELS, "embed", Some(out.dtype), per_item(n * e))?
        .buf(&table)
        .buf(&ids)
        .buf(&out)
        .i64(n)
        .i32(e)
        .go()
}

/// `embed_bwd(const T* dx, const unsigned* ids, float* dtable, long n, int e)`: adds each
/// row of dx (n, e) to row `ids[t]` of the f32 dtable (V, e).
pub fn embed_back(gpu: &Gpu, dx: &impl AsBuf, ids: &impl AsBuf, dtable: &impl AsBuf) -> Result<()> {
    let (dx, ids, dtable) = (dx.buf()?, ids.buf()?, dtable.buf()?);
    let (n, e) = (ids.n(), dtable.last());
    ids.expect("embed_bwd: ids", n, DType::U32)?;
    dx.expect("embed_bwd: dx", n * e, dx.dtype)?;
    dtable.expect("embed_bwd: dtable", dtable.n(), DType::F32)?;
    gpu.kernel(&KERNELS, "embed_bwd", Some(dx.dtype), per_item(n * e))?
        .buf(&dx)
        .buf(&ids)
        .buf(&dtable)
        .i64(n)
        .i32(e)
        .go()
}

/// The gather's backward into a bf16 dtable (V, e), the same bits every run: each token's rows
/// of dx (n, e) summed in f32 in position order, then added to its row of dtable once
/// (`dtable[id] = bf16(dtable[id] + sum)`; autograd adds the bf16 sum of a bf16 table's rows
/// to the head's bf16 gradient). `embed_seen` counts each token and finds its first position,
/// `embed_bwd_rows` sums from there.
pub fn embed_back_rows(
    gpu: &Gpu,
    dx: &impl AsBuf,
    ids: &impl AsBuf,
    dtable: &impl AsBuf,
) -> Result<()> {
    let (dx, ids, dtable) = (dx.buf()?, ids.buf()?, dtable.buf()?);
    let (n, e) = (ids.n(), dtable.last());
    ids.expect("embed_bwd_rows: ids", n, DType::U32)?;
    dx.expect("embed_bwd_rows: dx", n * e, dx.dtype)?;
    dtable.expect("embed_bwd_rows: dtable", dtable.n(), DType::BF16)?;
    let vocab = dtable.n() / e;
    let counts = gpu.zeros(2 * vocab, DType::U32)?;
    let seen = counts.buf()?;
    gpu.kernel(&KERNELS, "embed_seen", None, per_item(n))?
        .buf(&ids)
        .buf(&seen)
        .i64(n)
        .go()?;
    let cfg = LaunchConfig {
        grid_dim: (n as u32, e.div_ceil(256) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    gpu.kernel(&KERNELS, "embed_bwd_rows", Some(dx.dtype), cfg)?
        .buf(&dx)
        .buf(&ids)
        .buf(&seen)
        .buf(&dtable)
        .i64(n)
        .i32(e)
        .go()
}
