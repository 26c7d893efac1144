//! The candle side of the fused kernels: shared launch helpers here, one file per kernel
//! family. Each op's CPU forward is an error: callers (`super`) run the composed candle
//! version off CUDA.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
};
use std::sync::OnceLock;

const SOURCE: &str = include_str!("../kernels.cu");
const MODULE: &str = "ternlab_fused";

/// The `cpu_fwd` of an op with 1, 2 or 3 inputs that only exists on CUDA (the caller runs
/// the composed version elsewhere, so reaching it is a bug).
macro_rules! cuda_only {
    (1, $what:literal) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!("the fused ", $what, " runs on CUDA only"))
        }
    };
    (2, $what:literal) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!("the fused ", $what, " runs on CUDA only"))
        }
    };
    (3, $what:literal) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!(concat!("the fused ", $what, " runs on CUDA only"))
        }
    };
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling ternlab's CUDA kernels with NVRTC: {e}"))
    })
    .as_deref()
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn contiguous_f32<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the fused kernel needs a contiguous tensor");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// Launch shape for one warp per row.
fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u64 * 32).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the fused kernel needs a contiguous tensor");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("fused kernels take f32 or bf16, not {other:?}"),
    }
}

/// Allocates an output like `xs` and launches `kernel` with (input views..., output,
/// extra args...) for f32 or bf16 storage.
macro_rules! launch_like {
    ($dev:expr, $dtype:expr, $n:expr, $cfg:expr, $kernel:expr, [$($input:expr),*], [$($arg:expr),*]) => {{
        let f = $dev.get_or_load_custom_func(
            &format!("{}_{}", $kernel, suffix($dtype)?),
            MODULE,
            ptx()?,
        )?;
        macro_rules! go {
            ($t:ty) => {{
                let out = unsafe { $dev.alloc::<$t>($n)? };
                let mut b = f.builder();
                $( let v = $input.view::<$t>()?; b.arg(&v); )*
                b.arg(&out);
                $( b.arg(&$arg); )*
                unsafe { b.launch($cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, $dev.clone())
            }};
        }
        match $dtype {
            DType::F32 => go!(f32),
            _ => go!(half::bf16),
        }
    }};
}

/// A storage and its layout, viewed as a contiguous slice of T.
struct In<'a>(&'a CudaStorage, &'a Layout);

impl<'a> In<'a> {
    fn view<T: candle_core::cuda_backend::CudaDType>(
        &self,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        contiguous::<T>(self.0, self.1, "fused kernel input")
    }
}

mod adamw;
mod attention;
mod loss;
mod mlp;
mod norm;
pub mod step;
mod ternary;

pub use adamw::adamw_step;
pub use attention::{CausalSoftmax, Rope};
pub use loss::CrossEntropy;
pub use mlp::SiluMul;
use norm::rms_norm_bwd_w_launch;
pub use norm::RmsNorm;
pub use ternary::TernaryProjection;
