//! The residual stream's sum (`residual.cu`).

use super::launch::{family, per_item, AsBuf, Family, Gpu};
use candle_core::Result;

static KERNELS: Family = family!("ternlab_residual", "residual.cu");

/// `add(const T* a, const T* b, T* y, long n)`: y = a + b, all alike.
pub fn add(gpu: &Gpu, a: &impl AsBuf, b: &impl AsBuf, y: &impl AsBuf) -> Result<()> {
    let (a, b, y) = (a.buf()?, b.buf()?, y.buf()?);
    let n = a.n();
    b.expect("add: b", n, a.dtype)?;
    y.expect("add: y", n, a.dtype)?;
    gpu.kernel(&KERNELS, "add", Some(a.dtype), per_item(n.div_ceil(8)))?
        .buf(&a)
        .buf(&b)
        .buf(&y)
        .i64(n)
        .go()
}
