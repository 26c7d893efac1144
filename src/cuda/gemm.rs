//! Matrix products through cuBLAS: one strided-batched GEMM in row-major terms (`gemm`), and
//! the three products of a bias-free linear layer (`linear`, `linear_back_x`, `linear_back_w`).
//! f32 accumulation throughout (TF32 for f32 inputs when `train.dtype = "tf32"` set candle's
//! flag); weight gradients come out in f32, or rounded once to the inputs' bf16.

use super::launch::{profiling, AsBuf, Gpu};
use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as bsys};
use candle_core::{DType, Result, Tensor};

/// A row-major matrix operand or output of a GEMM: its address, dtype, whether it is used
/// transposed, and its row stride in elements (0: packed).
#[derive(Clone, Copy)]
pub struct Mat {
    p: u64,
    dtype: DType,
    t: bool,
    ld: usize,
}

impl Mat {
    /// A contiguous tensor as a packed matrix.
    pub fn of(t: &impl AsBuf) -> Result<Self> {
        let b = t.buf()?;
        Ok(Self {
            p: b.p,
            dtype: b.dtype,
            t: false,
            ld: 0,
        })
    }

    /// The same matrix, transposed.
    pub fn t(self) -> Self {
        Self { t: !self.t, ..self }
    }

    /// The matrix starting `elems` elements further on (a block of a bigger one).
    pub fn at(self, elems: usize) -> Self {
        Self {
            p: self.p + (elems * self.dtype.size_in_bytes()) as u64,
            ..self
        }
    }

    /// With row stride `ld` elements.
    pub fn ld(self, ld: usize) -> Self {
        Self { ld, ..self }
    }
}

/// Row-major `C (m, n) = op(A) (m, k) @ op(B) (k, n) + beta * C`, `batch` times with the given
/// element strides of A, B and C. A and B share a dtype; C is f32 or that dtype.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    gpu: &Gpu,
    (mm, nn, kk): (usize, usize, usize),
    a: Mat,
    b: Mat,
    c: Mat,
    beta: f32,
    batch: usize,
    (sa, sb, sc): (usize, usize, usize),
) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    if a.dtype != b.dtype || (c.dtype != a.dtype && c.dtype != DType::F32) || c.t {
        candle_core::bail!(
            "gemm: inputs {:?} and {:?}, output {:?}{}",
            a.dtype,
            b.dtype,
            c.dtype,
            if c.t { " transposed" } else { "" }
        );
    }
    let ty = |d: DType| match d {
        DType::BF16 => bsys::cudaDataType_t::CUDA_R_16BF,
        _ => bsys::cudaDataType_t::CUDA_R_32F,
    };
    let compute =
        if a.dtype == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
    // cuBLAS is column-major: compute C^T (n, m) = op(B)^T @ op(A)^T. A row-major matrix with
    // row stride ld is, column-major, its transpose with the same leading dimension.
    let or = |ld: usize, packed: usize| if ld == 0 { packed } else { ld };
    let (op_b, ldb) = if b.t {
        (CUBLAS_OP_T, or(b.ld, kk))
    } else {
        (CUBLAS_OP_N, or(b.ld, nn))
    };
    let (op_a, lda) = if a.t {
        (CUBLAS_OP_T, or(a.ld, mm))
    } else {
        (CUBLAS_OP_N, or(a.ld, kk))
    };
    let ldc = or(c.ld, nn);
    let alpha = 1f32;
    let name = if profiling() {
        let t = |x: bool| if x { "T" } else { "" };
        format!(
            "gemm {mm}x{nn}x{kk}{}{} x{batch}{}",
            t(a.t),
            t(b.t),
            if c.dtype == DType::F32 && a.dtype != DType::F32 {
                " ->f32"
            } else {
                ""
            }
        )
    } else {
        String::new()
    };
    // (inside `Side::run`: the side stream's handle)
    let handle = match super::side::current() {
        Some(lane) => lane.blas.clone(),
        None => gpu.dev.cublas_handle(),
    };
    gpu.timed(&name, || {
        unsafe {
            blas::gemm_strided_batched_ex(
                *handle.handle(),
                op_b,
                op_a,
                nn as i32,
                mm as i32,
                kk as i32,
                &alpha as *const f32 as *const _,
                b.p as *const _,
                ty(b.dtype),
                ldb as i32,
                sb as i64,
                a.p as *const _,
                ty(a.dtype),
                lda as i32,
                sa as i64,
                &beta as *const f32 as *const _,
                c.p as *mut _,
                ty(c.dtype),
                ldc as i32,
                sc as i64,
                batch as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS GEMM: {e:?}")))
    })
}

/// `y = x (n, in) @ w^T` with w (out, in): a projection's output (n, out), in x's dtype.
pub fn linear(gpu: &Gpu, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let y = gpu.empty((n, out), x.dtype())?;
    let (a, b) = (Mat::of(x)?, Mat::of(w)?.t());
    gemm(gpu, (n, out, inp), a, b, Mat::of(&y)?, 0., 1, (0, 0, 0))?;
    Ok(y)
}

/// `dx (+)= dy (n, out) @ w (out, in)`: the input's gradient, added into dx when beta = 1
/// (q, k and v, or gate and up, share their input).
pub fn linear_back_x(gpu: &Gpu, dy: &Tensor, w: &Tensor, dx: &Tensor, beta: f32) -> Result<()> {
    let (n, out) = dy.dims2()?;
    let inp = w.dim(1)?;
    let (a, b) = (Mat::of(dy)?, Mat::of(w)?);
    gemm(gpu, (n, inp, out), a, b, Mat::of(dx)?, beta, 1, (0, 0, 0))
}

/// `dw = dy^T (out, n) @ x (n, in)`: the weight's gradient, in f32.
pub fn linear_back_w(gpu: &Gpu, dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let dw = gpu.empty((dy.dim(1)?, x.dim(1)?), DType::F32)?;
    linear_back_w_into(gpu, dy, x, &dw)?;
    Ok(dw)
}

/// `linear_back_w` into `dw` (out, in): f32, or the inputs' dtype (the f32 sums rounded once).
pub fn linear_back_w_into(gpu: &Gpu, dy: &Tensor, x: &Tensor, dw: &Tensor) -> Result<()> {
    let (n, out) = dy.dims2()?;
    let inp = x.dim(1)?;
    if dw.dims() != [out, inp] || (dw.dtype() != DType::F32 && dw.dtype() != dy.dtype()) {
        candle_core::bail!(
            "linear_back_w: dw is {:?} {:?}, not ({out}, {inp}) f32 or {:?}",
            dw.dims(),
            dw.dtype(),
            dy.dtype()
        );
    }
    let (a, b) = (Mat::of(dy)?.t(), Mat::of(x)?);
    gemm(gpu, (out, inp, n), a, b, Mat::of(dw)?, 0., 1, (0, 0, 0))
}
