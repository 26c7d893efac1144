//! Causal attention's own kernels (`attention.cu`): typed launchers, and the autograd ops
//! (q/k norm + RoPE, causal softmax) whose backward runs the same kernels as the hand-written
//! step. The blocked GEMMs around them are `causal_attention.rs`.

use super::launch::{
    alloc, blocks, cuda_only, family, per_item, warp_per_row, AsBuf, Buf, Family, Gpu,
};
use super::norm;
use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

static KERNELS: Family = family!("ternlab_attention", "attention.cu");

/// `norm_rope(const T* x, const float* w, const float* cos, const float* sin, T* y, long rows,
/// int heads, int group, int l, int d, float eps, long xs)`: x (B, L, heads, d) -> y (B, heads /
/// group, L, group, d) = RoPE(RMSNorm(x) * w), with cos, sin (L, d) f32 and w (d) f32.
#[allow(clippy::too_many_arguments)]
pub fn norm_rope(
    gpu: &Gpu,
    x: &impl AsBuf,
    w: &impl AsBuf,
    cos: &impl AsBuf,
    sin: &impl AsBuf,
    y: &impl AsBuf,
    (heads, group): (usize, usize),
    eps: f32,
) -> Result<()> {
    let d = w.buf()?.n();
    let x = TokenRows::packed(x.buf()?, heads * d);
    norm_rope_rows(gpu, &x, w, (cos, sin), y, (heads, group), eps)
}

/// Rows (B, L, heads, d) whose tokens start `stride` elements apart in `buf` (whose dims are
/// the packed tensor's): heads * d for a tensor of its own, the fused row's width for one
/// projection's columns of a fused projection's output or of its gradient.
#[derive(Clone, Debug)]
pub struct TokenRows {
    pub buf: Buf,
    pub stride: usize,
}

impl TokenRows {
    /// The packed rows of `buf`, tokens `width` elements apart.
    pub fn packed(buf: Buf, width: usize) -> Self {
        Self { buf, stride: width }
    }

    /// Columns [at, at + width) of a contiguous (N, W) tensor: rows (N, width), W apart.
    pub fn columns(t: &Tensor, at: usize, width: usize) -> Result<Self> {
        let (n, w) = t.dims2()?;
        let b = t.buf()?;
        if at + width > w {
            candle_core::bail!("columns {at}..{} of rows of {w}", at + width);
        }
        Ok(Self {
            buf: Buf {
                p: b.p + (at * b.dtype.size_in_bytes()) as u64,
                dtype: b.dtype,
                dims: vec![n, width],
            },
            stride: w,
        })
    }

    /// Fails unless each of the vectorized kernels' accesses of `v` values stays aligned.
    fn check_stride(&self, what: &str, v: usize, width: usize) -> Result<()> {
        let bytes = (v * self.buf.dtype.size_in_bytes()).min(16);
        if self.stride < width
            || !(self.stride * self.buf.dtype.size_in_bytes()).is_multiple_of(bytes)
        {
            candle_core::bail!(
                "{what}: rows of {width} {stride} elements apart (at least {width}, keeping \
                 {bytes}-byte accesses aligned)",
                stride = self.stride
            );
        }
        Ok(())
    }
}

/// `norm_rope` of rows whose tokens may lie further apart than heads * d (`TokenRows`).
pub fn norm_rope_rows(
    gpu: &Gpu,
    rows_of: &TokenRows,
    w: &impl AsBuf,
    (cos, sin): (&impl AsBuf, &impl AsBuf),
    y: &impl AsBuf,
    (heads, group): (usize, usize),
    eps: f32,
) -> Result<()> {
    let (w, y) = (w.buf()?, y.buf()?);
    let set = RopeRows {
        x: rows_of,
        w: &w,
        y: &y,
        heads,
        group,
        eps,
    };
    norm_rope_sets(gpu, &[set], (&cos.buf()?, &sin.buf()?))
}

/// One set of rows of `norm_rope_pair`: `norm_rope_rows`'s arguments but the tables.
pub struct RopeRows<'a> {
    pub x: &'a TokenRows,
    pub w: &'a Buf,
    pub y: &'a Buf,
    pub heads: usize,
    pub group: usize,
    pub eps: f32,
}

/// `norm_rope_rows` of two sets of rows (a layer's q and k) with the same tables, in one
/// launch where the vectorized kernel takes both (one fewer launch a layer), else in two.
pub fn norm_rope_pair(
    gpu: &Gpu,
    sets: [RopeRows; 2],
    (cos, sin): (&impl AsBuf, &impl AsBuf),
) -> Result<()> {
    norm_rope_sets(gpu, &sets, (&cos.buf()?, &sin.buf()?))
}

/// The launches of `norm_rope_rows` or `norm_rope_pair`: one `norm_rope{V}` where every set
/// takes the same vectorized kernel, else one per set.
fn norm_rope_sets(gpu: &Gpu, sets: &[RopeRows], (cos, sin): (&Buf, &Buf)) -> Result<()> {
    let mut kernels = Vec::with_capacity(sets.len());
    for set in sets {
        let RopeRows { x, w, y, .. } = *set;
        let (heads, group) = (set.heads, set.group);
        let (d, l) = (w.n(), cos.dims[0]);
        check_heads("norm_rope", &x.buf, cos, sin, (heads, group), d)?;
        y.expect("norm_rope: y", x.buf.n(), x.buf.dtype)?;
        let vector = vector_width(d, &[&x.buf, y, w, cos, sin]);
        x.check_stride("norm_rope: x", vector.unwrap_or(1), heads * d)?;
        let wk = norm::weight_kind("norm_rope", w, d, vector.is_some(), SIZES)?;
        let rows = x.buf.n() / d;
        let Some(v) = vector else {
            gpu.kernel(&KERNELS, "norm_rope", Some(x.buf.dtype), warp_per_row(rows))?
                .buf(&x.buf)
                .buf(w)
                .buf(cos)
                .buf(sin)
                .buf(y)
                .i64(rows)
                .i32(heads)
                .i32(group)
                .i32(l)
                .i32(d)
                .f32(set.eps)
                .i64(x.stride)
                .go()?;
            continue;
        };
        // (ROPE_ROWS rows a warp)
        let nb = warp_per_row(rows.div_ceil(ROPE_ROWS)).grid_dim.0 as usize;
        kernels.push((format!("norm_rope{v}{wk}"), nb, (set, rows)));
    }
    for (name, all, nb0, first, last) in pair_launches(&kernels) {
        let dtype = Some(first.0.x.buf.dtype);
        let mut args = gpu.kernel(&KERNELS, name, dtype, blocks(all, 256))?;
        for (s, rows) in [first, last] {
            args = args
                .buf(&s.x.buf)
                .buf(s.w)
                .buf(s.y)
                .i64(*rows)
                .i32(s.heads)
                .i32(s.group)
                .f32(s.eps)
                .i64(s.x.stride);
        }
        args.buf(cos).buf(sin).i32(cos.dims[0]).i32(nb0).go()?;
    }
    Ok(())
}

/// `rope_bwd(const T* dy, const float* cos, const float* sin, T* g, long rows, int heads,
/// int group, int l, int d)`: the transpose of `norm_rope`'s RoPE and head transpose,
/// dy (B, heads / group, L, group, d) -> g (B, L, heads, d).
pub fn rope_back(
    gpu: &Gpu,
    dy: &impl AsBuf,
    cos: &impl AsBuf,
    sin: &impl AsBuf,
    g: &impl AsBuf,
    (heads, group): (usize, usize),
) -> Result<()> {
    let (dy, cos, sin, g) = (dy.buf()?, cos.buf()?, sin.buf()?, g.buf()?);
    let (d, l) = (cos.last(), cos.dims[0]);
    check_heads("rope_bwd", &dy, &cos, &sin, (heads, group), d)?;
    g.expect("rope_bwd: g", dy.n(), dy.dtype)?;
    let rows = dy.n() / d;
    gpu.kernel(&KERNELS, "rope_bwd", Some(dy.dtype), warp_per_row(rows))?
        .buf(&dy)
        .buf(&cos)
        .buf(&sin)
        .buf(&g)
        .i64(rows)
        .i32(heads)
        .i32(group)
        .i32(l)
        .i32(d)
        .go()
}

/// Rows a warp of `norm_rope{V}` takes (its NR in attention.cu).
const ROPE_ROWS: usize = 4;

/// The head dims the vectorized kernels take.
const SIZES: &str = "64, 128 or 256";

/// Whether the vectorized kernels take head dim `d` (64, 128 or 256), so a bf16 weight can go
/// to them as it is (given aligned buffers).
pub fn takes_bf16_weight(d: usize) -> bool {
    d.is_multiple_of(32) && matches!(d / 32, 2 | 4 | 8)
}

/// The values per lane of the vectorized kernels (`norm_rope{V}`, `rope_norm_bwd{V}`) for rows
/// of `d`, if they take it: d = 32 * V for V = 2, 4 or 8, every buffer aligned for a lane's V
/// values in one access (at most 16 bytes).
fn vector_width(d: usize, bufs: &[&Buf]) -> Option<usize> {
    let v = d / 32;
    let aligned = bufs.iter().all(|b| {
        let bytes = (v * b.dtype.size_in_bytes()).min(16) as u64;
        bytes > 0 && b.p.is_multiple_of(bytes)
    });
    (d.is_multiple_of(32) && matches!(v, 2 | 4 | 8) && aligned).then_some(v)
}

/// The backward of `norm_rope`: dy (B, heads / group, L, group, d), the gradient of its
/// output, to dx (B, L, heads, d), written, for input x and f32 weight w (d); returns the
/// weight's gradient (d, f32; added into `dw` where given, zeroed by the caller). One kernel,
/// `rope_norm_bwd{V}` (two sets of `const T* dy, const T* x, const W* w, T* dx, float* dw,
/// long rows, int heads, int group, float eps, int per_block, long xs, long dxs`, then `const
/// float* cos, const float* sin, int l, int nb0`: see attention.cu), where `vector_width`
/// allows; otherwise `rope_bwd` and the norm's backward.
#[allow(clippy::too_many_arguments)]
pub fn rope_norm_back(
    gpu: &Gpu,
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    dx: &Tensor,
    (heads, group): (usize, usize),
    eps: f32,
    dw: Option<Tensor>,
) -> Result<Tensor> {
    let d = w.elem_count();
    let (xb, dxb) = (x.buf()?, dx.buf()?);
    let bufs = [&dy.buf()?, &xb, &dxb, &w.buf()?, &cos.buf()?, &sin.buf()?];
    if vector_width(d, &bufs).is_none() {
        let g = gpu.empty(dy.shape(), dy.dtype())?;
        rope_back(gpu, dy, cos, sin, &g, (heads, group))?;
        let rows = x.elem_count() / d;
        let (x, g) = (x.reshape((rows, d))?, g.reshape((rows, d))?);
        return norm::backward(gpu, &x, w, &g, dx, eps, false, dw);
    }
    let (x, dx) = (
        TokenRows::packed(xb, heads * d),
        TokenRows::packed(dxb, heads * d),
    );
    rope_norm_back_rows(gpu, dy, (&x, w), (cos, sin), &dx, (heads, group), eps, dw)
}

/// `rope_norm_back` by the vectorized kernel, where x and dx may be rows whose tokens lie
/// further apart than heads * d (`TokenRows`).
#[allow(clippy::too_many_arguments)]
pub fn rope_norm_back_rows(
    gpu: &Gpu,
    dy: &Tensor,
    (x, w): (&TokenRows, &Tensor),
    tables: (&Tensor, &Tensor),
    dx: &TokenRows,
    (heads, group): (usize, usize),
    eps: f32,
    dw: Option<Tensor>,
) -> Result<Tensor> {
    let dw = match dw {
        Some(dw) => dw,
        None => gpu.zeros(w.elem_count(), DType::F32)?,
    };
    let set = RopeBack {
        dy,
        x,
        w,
        dx,
        heads,
        group,
        eps,
        dw: &dw,
    };
    rope_norm_back_sets(gpu, &[set], tables)?;
    Ok(dw)
}

/// One set of rows of `rope_norm_back_pair`: `rope_norm_back_rows`'s arguments but the tables,
/// the weight's gradient added into `dw` (f32, zeroed by the caller).
pub struct RopeBack<'a> {
    pub dy: &'a Tensor,
    pub x: &'a TokenRows,
    pub w: &'a Tensor,
    pub dx: &'a TokenRows,
    pub heads: usize,
    pub group: usize,
    pub eps: f32,
    pub dw: &'a Tensor,
}

/// `rope_norm_back_rows` of two sets of rows (a layer's q and k) with the same tables, in one
/// launch where both take the same kernel (one fewer launch a layer), else in two.
pub fn rope_norm_back_pair(
    gpu: &Gpu,
    sets: [RopeBack; 2],
    tables: (&Tensor, &Tensor),
) -> Result<()> {
    rope_norm_back_sets(gpu, &sets, tables)
}

/// The launches of `rope_norm_back_rows` or `rope_norm_back_pair`.
fn rope_norm_back_sets(gpu: &Gpu, sets: &[RopeBack], (cos, sin): (&Tensor, &Tensor)) -> Result<()> {
    let (cb, sb) = (cos.buf()?, sin.buf()?);
    let mut kernels = Vec::with_capacity(sets.len());
    for set in sets {
        let RopeBack { x, dx, .. } = *set;
        let (heads, group) = (set.heads, set.group);
        let d = set.w.elem_count();
        let (dyb, wb, dwb) = (set.dy.buf()?, set.w.buf()?, set.dw.buf()?);
        let (xb, dxb) = (&x.buf, &dx.buf);
        let Some(v) = vector_width(d, &[&dyb, xb, dxb, &wb, &cb, &sb]) else {
            candle_core::bail!(
                "rope_norm_bwd: rows of {d} (or buffers) that the vectorized kernel does not take"
            );
        };
        x.check_stride("rope_norm_bwd: x", v, heads * d)?;
        dx.check_stride("rope_norm_bwd: dx", v, heads * d)?;
        dwb.expect("rope_norm_bwd: dw", d, DType::F32)?;
        check_heads("rope_norm_bwd", &dyb, &cb, &sb, (heads, group), d)?;
        let wk = norm::weight_kind("rope_norm_bwd", &wb, d, true, SIZES)?;
        xb.expect("rope_norm_bwd: x", dyb.n(), dyb.dtype)?;
        dxb.expect("rope_norm_bwd: dx", dyb.n(), dyb.dtype)?;
        // at least ~1,000 blocks where there are rows for them: a warp's rows run one after
        // another
        let rows = dyb.n() / d;
        let per_block = rows.div_ceil(1024).next_multiple_of(8).clamp(8, 64);
        let name = format!("rope_norm_bwd{v}{wk}");
        kernels.push((
            name,
            rows.div_ceil(per_block),
            (set, dyb, wb, dwb, rows, per_block),
        ));
    }
    for (name, all, nb0, first, last) in pair_launches(&kernels) {
        let mut args = gpu.kernel(&KERNELS, name, Some(first.1.dtype), blocks(all, 256))?;
        for (s, dyb, wb, dwb, rows, per_block) in [first, last] {
            args = args
                .buf(dyb)
                .buf(&s.x.buf)
                .buf(wb)
                .buf(&s.dx.buf)
                .buf(dwb)
                .i64(*rows)
                .i32(s.heads)
                .i32(s.group)
                .f32(s.eps)
                .i32(*per_block)
                .i64(s.x.stride)
                .i64(s.dx.stride);
        }
        args.buf(&cb).buf(&sb).i32(cb.dims[0]).i32(nb0).go()?;
    }
    Ok(())
}

/// How up to two sets of rows are launched, each set naming its kernel and blocks: one launch
/// (set 0's blocks, then set 1's) where both name the same kernel, else one each. Yields the
/// kernel, all its blocks, set 0's blocks, and the first and the last set's items (the same
/// where a launch has one set: the kernels take two sets, and all its blocks work on the first).
fn pair_launches<T>(sets: &[(String, usize, T)]) -> Vec<(&str, usize, usize, &T, &T)> {
    let one = sets.len() == 2 && sets[0].0 == sets[1].0;
    let launches: Vec<&[_]> = if one {
        vec![sets]
    } else {
        sets.chunks(1).collect()
    };
    launches
        .into_iter()
        .map(|l| {
            let (name, nb0, first) = &l[0];
            let (_, _, last) = l.last().expect("a set");
            (
                name.as_str(),
                l.iter().map(|k| k.1).sum(),
                *nb0,
                first,
                last,
            )
        })
        .collect()
}

/// x holds whole (L, heads, d) sequences for tables (L, d), and `group` divides `heads`.
fn check_heads(
    what: &str,
    x: &Buf,
    cos: &Buf,
    sin: &Buf,
    (heads, group): (usize, usize),
    d: usize,
) -> Result<()> {
    let l = cos.dims[0];
    cos.expect(&format!("{what}: cos"), l * d, DType::F32)?;
    sin.expect(&format!("{what}: sin"), l * d, DType::F32)?;
    if group == 0 || !heads.is_multiple_of(group) || !x.n().is_multiple_of(l * heads * d) {
        candle_core::bail!(
            "{what}: {:?} is not sequences of {l} positions x {heads} heads x {d}, in groups of {group}",
            x.dims
        );
    }
    // (the kernels work out a row's position and head in 32 bits: `RopeWalk` in attention.cu)
    if x.n() / d > u32::MAX as usize {
        candle_core::bail!(
            "{what}: {} rows of {d}, more than the {} the kernels index",
            x.n() / d,
            u32::MAX
        );
    }
    Ok(())
}

/// `causal_softmax(const T* x, T* p, long rows, int l, int group, int chunk, float scale)`:
/// p = causal softmax of `scale * x` over rows of l keys (in place allowed), row r being query
/// position (r / group) % l; with blocks of `chunk` positions only each row's block is
/// written (see `causal_attention.rs`; chunk = l writes whole rows).
pub fn causal_softmax(
    gpu: &Gpu,
    x: &impl AsBuf,
    p: &impl AsBuf,
    (group, chunk): (usize, usize),
    scale: f32,
) -> Result<()> {
    let (x, p) = (x.buf()?, p.buf()?);
    let l = x.last();
    p.expect("causal_softmax: p", x.n(), x.dtype)?;
    let rows = x.n() / l;
    gpu.kernel(
        &KERNELS,
        "causal_softmax",
        Some(x.dtype),
        warp_per_row(rows),
    )?
    .buf(&x)
    .buf(&p)
    .i64(rows)
    .i32(l)
    .i32(group)
    .i32(chunk)
    .f32(scale)
    .go()
}

/// `causal_softmax_bwd(const T* p, const T* dy, T* dx, long rows, int l, int group, int chunk,
/// float scale)`: dx = scale * p * (dy - sum(dy * p)) per row (in place allowed).
pub fn causal_softmax_back(
    gpu: &Gpu,
    p: &impl AsBuf,
    dy: &impl AsBuf,
    dx: &impl AsBuf,
    (group, chunk): (usize, usize),
    scale: f32,
) -> Result<()> {
    let (p, dy, dx) = (p.buf()?, dy.buf()?, dx.buf()?);
    let l = p.last();
    dy.expect("causal_softmax_bwd: dy", p.n(), p.dtype)?;
    dx.expect("causal_softmax_bwd: dx", p.n(), p.dtype)?;
    let rows = p.n() / l;
    gpu.kernel(
        &KERNELS,
        "causal_softmax_bwd",
        Some(p.dtype),
        warp_per_row(rows),
    )?
    .buf(&p)
    .buf(&dy)
    .buf(&dx)
    .i64(rows)
    .i32(l)
    .i32(group)
    .i32(chunk)
    .f32(scale)
    .go()
}

/// `swap_axes(const unsigned* x, unsigned* y, unsigned total, int words, int nb, int nc)`:
/// y (a, nc, nb, row) = x (a, nb, nc, row), for rows of whole 4-byte words.
pub fn swap_axes(
    gpu: &Gpu,
    x: &impl AsBuf,
    y: &impl AsBuf,
    (a, nb, nc, row): (usize, usize, usize, usize),
) -> Result<()> {
    let (x, y) = (x.buf()?, y.buf()?);
    let n = a * nb * nc * row;
    x.expect("swap_axes: x", n, x.dtype)?;
    y.expect("swap_axes: y", n, x.dtype)?;
    let bytes = row * x.dtype.size_in_bytes();
    if !bytes.is_multiple_of(4) || n * x.dtype.size_in_bytes() / 4 > u32::MAX as usize {
        candle_core::bail!("swap_axes: rows of {bytes} bytes: needs whole 4-byte words");
    }
    let (words, total) = (bytes / 4, n * x.dtype.size_in_bytes() / 4);
    gpu.kernel(&KERNELS, "swap_axes", None, per_item(total))?
        .buf(&x)
        .buf(&y)
        .u32(total)
        .i32(words)
        .i32(nb)
        .i32(nc)
        .go()
}

/// q or k after its per-head RMSNorm and RoPE: x (B, L, N, D), contiguous, with the f32
/// weight `w` (D) and tables cos, sin (L, D) -> (B, N, L, D). One kernel each way, the
/// step's: `norm_rope` with group 1, and `rope_back` + `norm::backward`.
pub fn norm_rope_op(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let op = NormRope {
        eps: eps as f32,
        cos: cos.clone(),
        sin: sin.clone(),
    };
    x.apply_op2(w, op)
}

struct NormRope {
    eps: f32,
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp2 for NormRope {
    fn name(&self) -> &'static str {
        "norm-rope"
    }

    cuda_only!(2, "q/k norm and RoPE");

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, l, n, d) = xl.shape().dims4()?;
        let shape = Shape::from((b, n, l, d));
        let (y, yb) = alloc(xs.device(), xs.dtype(), &shape)?;
        let gpu = Gpu::new(xs.device());
        let (x, w) = (Buf::of(xs, xl)?, Buf::of(ws, wl)?);
        norm_rope(&gpu, &x, &w, &self.cos, &self.sin, &yb, (n, 1), self.eps)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gpu = Gpu::of(x.device())?;
        let n = x.dim(2)?;
        let dx = gpu.empty(x.shape(), x.dtype())?;
        let (dy, x) = (dy.contiguous()?, x.contiguous()?);
        let tables = (&self.cos, &self.sin);
        let dw = rope_norm_back(&gpu, &dy, &x, w, tables, &dx, (n, 1), self.eps, None)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Causal softmax of `scale * scores` over the last dim of (..., L, L), contiguous, in f32
/// arithmetic, in the scores' dtype: the step's kernels with whole rows.
pub fn causal_softmax_op(scores: &Tensor, scale: f64) -> Result<Tensor> {
    scores.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    cuda_only!(1, "causal softmax");

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (p, pb) = alloc(xs.device(), xs.dtype(), xl.shape())?;
        let x = Buf::of(xs, xl)?;
        let l = x.last();
        causal_softmax(&Gpu::new(xs.device()), &x, &pb, (1, l), self.scale)?;
        Ok((p, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, dp: &Tensor) -> Result<Option<Tensor>> {
        let gpu = Gpu::of(p.device())?;
        let ds = gpu.empty(p.shape(), p.dtype())?;
        let l = p.dim(candle_core::D::Minus1)?;
        causal_softmax_back(&gpu, p, &dp.contiguous()?, &ds, (1, l), self.scale)?;
        Ok(Some(ds))
    }
}

#[cfg(test)]
mod tests {
    use super::pair_launches;

    /// Two sets that name one kernel share a launch (set 0's blocks first); sets that name two
    /// kernels, or a single set, take a launch each, the set in both places.
    #[test]
    fn sets_of_one_kernel_share_a_launch() {
        let same = [("k4".to_string(), 3, 'q'), ("k4".to_string(), 2, 'k')];
        assert_eq!(pair_launches(&same), vec![("k4", 5, 3, &'q', &'k')]);
        let two = [("k4".to_string(), 3, 'q'), ("k8".to_string(), 2, 'k')];
        let each = vec![("k4", 3, 3, &'q', &'q'), ("k8", 2, 2, &'k', &'k')];
        assert_eq!(pair_launches(&two), each);
        let one = [("k4".to_string(), 7, 'q')];
        assert_eq!(pair_launches(&one), vec![("k4", 7, 7, &'q', &'q')]);
    }
}
