//! In-place AdamW steps of f32 and bf16 parameters, all of a model's in one launch
//! (`adamw.cu`; the two arithmetics are `crate::optim`'s, which the kernel reproduces to the
//! bit).

use super::launch::{blocks, family, AsBuf, Buf, Family, Gpu};
use super::ternary;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Result};

static KERNELS: Family = family!("ternlab_adamw", ["ternary.cuh", "adamw.cu"]);

/// The step's scalars, already in the parameter's precision (see `crate::optim::StepConstants`).
pub struct Scalars {
    pub lr: f32,
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    pub decay: f32,
    /// f32: the bias corrections of m and v (`scale_m`, `scale_v`); bf16: MLX's `c1`, `c2`.
    pub correction: (f32, f32),
    pub bias_correction: bool,
}

/// A parameter, its moments and its gradient as the kernels take them (the gradient f32, or
/// bf16: a weight gradient from products run in bf16, as the GEMM rounded it).
fn check(p: &Buf, m: &Buf, v: &Buf, g: &Buf) -> Result<()> {
    let n = p.n();
    if !matches!(p.dtype, DType::F32 | DType::BF16) {
        candle_core::bail!(
            "fused AdamW: a {:?} parameter (train.dense_dtype = \"checkpoint\" on such a \
             checkpoint); the CUDA kernels take f32 or bf16: set train.dense_dtype = \"f32\"",
            p.dtype
        );
    }
    m.expect("fused AdamW: the first moment", n, p.dtype)?;
    v.expect("fused AdamW: the second moment", n, p.dtype)?;
    let g_dtype = if g.dtype == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    g.expect("fused AdamW: the gradient", n, g_dtype)
}

/// One parameter of a multi-tensor update, as `adamw.cu`'s `AdamwEntry` lays it out: its
/// buffers, its length (0: not updated this step), its scalars (`Scalars`, in the order lr,
/// b1, 1 - b1, b2, 1 - b2, eps, decay, correction), whether it and its gradient are bf16,
/// and where the kernel writes the ternary projection of the updated weights
/// (`Entry::writing`; 0: nowhere).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Entry {
    pub p: u64,
    pub m: u64,
    pub v: u64,
    pub g: u64,
    pub n: i64,
    pub k: [f32; 9],
    pub bf16: i32,
    pub bias_correction: i32,
    pub g_bf16: i32,
    wt: u64,
    fold: ternary::VectorArgs,
    wt_bf16: i32,
    pad2: i32,
}

// (adamw.cu's AdamwEntry: 128 bytes, `wt` at 88)
const _: () = assert!(std::mem::size_of::<Entry>() == 128);
const _: () = assert!(std::mem::offset_of!(Entry, wt) == 88);

impl Entry {
    /// The entry of parameter `p` with moments `m`, `v` and gradient `g` (f32 or bf16), at `k`.
    pub fn new(
        p: &impl AsBuf,
        m: &impl AsBuf,
        v: &impl AsBuf,
        g: &impl AsBuf,
        k: &Scalars,
    ) -> Result<Self> {
        let (p, m, v, g) = (p.buf()?, m.buf()?, v.buf()?, g.buf()?);
        let n = p.n();
        check(&p, &m, &v, &g)?;
        // (the kernel reads four values at a time)
        if [p.p, m.p, v.p, g.p].iter().any(|a| a % 16 != 0) {
            candle_core::bail!("fused AdamW: buffers must start 16-byte aligned");
        }
        Ok(Self {
            p: p.p,
            m: m.p,
            v: v.p,
            g: g.p,
            n: n as i64,
            k: [
                k.lr,
                k.b1,
                k.one_minus_b1,
                k.b2,
                k.one_minus_b2,
                k.eps,
                k.decay,
                k.correction.0,
                k.correction.1,
            ],
            bf16: i32::from(p.dtype == DType::BF16),
            bias_correction: i32::from(k.bias_correction),
            g_bf16: i32::from(g.dtype == DType::BF16),
            ..Default::default()
        })
    }

    /// The same entry that also writes `W_t` of the updated weights into `wt` (f32 or bf16,
    /// the parameter's count), as `ternary::ternarize` would make it from them with the
    /// 16-byte kernel's arguments `fold` (`ternary::vector_args`). The parameter must be f32.
    pub fn writing(self, wt: &impl AsBuf, fold: ternary::VectorArgs) -> Result<Self> {
        let wt = wt.buf()?;
        if self.bf16 != 0 {
            candle_core::bail!("fused AdamW: only an f32 latent writes its ternary projection");
        }
        let dtype = if wt.dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        wt.expect(
            "fused AdamW: the ternary projection",
            self.n as usize,
            dtype,
        )?;
        if !wt.p.is_multiple_of(16) || !(self.n as usize).is_multiple_of(fold.span()) {
            candle_core::bail!(
                "fused AdamW: a projection written from the update must start 16-byte aligned \
                 and be whole spans of {} weights",
                fold.span()
            );
        }
        Ok(Self {
            wt: wt.p,
            fold,
            wt_bf16: i32::from(dtype == DType::BF16),
            ..self
        })
    }
}

/// Elements of one parameter that one block of `adamw_multi` updates (a multiple of the 512
/// weights a warp takes at a time where it writes a ternary projection too).
const CHUNK: usize = 32 * 1024;

/// The device side of multi-tensor AdamW over a fixed list of parameter sizes: the table of
/// entries (rewritten every step: each step's scalars, and the gradients' addresses) and the
/// list of (entry, chunk) blocks, made once. The kernel reads both from the device, so a CUDA
/// graph that captured the launch replays with whatever table was written before it.
pub struct MultiTable {
    gpu: Gpu,
    entries: CudaSlice<u8>,
    chunks: CudaSlice<u32>,
    len: usize,
    blocks: usize,
}

impl MultiTable {
    /// A table for parameters of `sizes` elements, in this order.
    pub fn new(gpu: &Gpu, sizes: &[usize]) -> Result<Self> {
        let stream = gpu.dev.cuda_stream();
        let mut chunks = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            for c in 0..n.div_ceil(CHUNK).max(1) {
                chunks.extend([i as u32, c as u32]);
            }
        }
        let blocks = chunks.len() / 2;
        let chunks = stream.clone_htod(&chunks).w()?;
        let entries = stream
            .alloc_zeros::<u8>(sizes.len().max(1) * std::mem::size_of::<Entry>())
            .w()?;
        Ok(Self {
            gpu: gpu.clone(),
            entries,
            chunks,
            len: sizes.len(),
            blocks,
        })
    }

    /// Writes the table (stream-ordered: kernels launched before read the previous one).
    pub fn write(&mut self, entries: &[Entry]) -> Result<()> {
        if entries.len() != self.len {
            candle_core::bail!(
                "multi-tensor AdamW: {} entries for a table of {}",
                entries.len(),
                self.len
            );
        }
        // SAFETY: `Entry` is plain old data with the C layout the kernel reads.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                entries.as_ptr().cast::<u8>(),
                std::mem::size_of_val(entries),
            )
        };
        let stream = self.gpu.dev.cuda_stream();
        stream.memcpy_htod(bytes, &mut self.entries).w()?;
        Ok(())
    }

    /// `adamw_multi(const AdamwEntry* entries, const uint2* chunks, long chunk,
    /// const float* gate)`: every parameter of the last table written, updated in place, in one
    /// launch; with a `gate` (an f32 on the device) only if it is finite.
    pub fn launch(&self, gate: Option<u64>) -> Result<()> {
        let stream = self.gpu.dev.cuda_stream();
        let e = self.entries.device_ptr(&stream).0;
        let c = self.chunks.device_ptr(&stream).0;
        let ptr = |p: u64| Buf {
            p,
            dtype: DType::U32,
            dims: vec![0],
        };
        self.gpu
            .kernel(&KERNELS, "adamw_multi", None, blocks(self.blocks, 256))?
            .buf(&ptr(e))
            .buf(&ptr(c))
            .i64(CHUNK)
            .opt(gate.map(ptr).as_ref())
            .go()
    }
}
