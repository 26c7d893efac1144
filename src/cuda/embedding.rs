//! The token embedding's gather and its backward (`embedding.cu`).

use super::launch::{family, per_item, AsBuf, Family, Gpu};
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
