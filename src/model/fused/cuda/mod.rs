//! The candle side of the fused kernels: shared launch helpers here, one file per kernel
//! family. Each op's CPU forward is an error: callers (`super`) run the composed candle
//! version off CUDA.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
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

/// A kernel argument: a device address or a scalar.
pub(super) enum Arg {
    P(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
}
use Arg::*;

/// The device address of the first element of a contiguous storage view.
fn sptr(s: &CudaStorage, l: &Layout, what: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the fused kernel needs a contiguous tensor");
    };
    let stream = s.device().cuda_stream();
    let (p, size) = match s.dtype() {
        DType::F32 => (s.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
        DType::U32 => (s.as_cuda_slice::<u32>()?.device_ptr(&stream).0, 4),
        other => candle_core::bail!("{what}: the fused kernels do not take {other:?}"),
    };
    Ok(p + (start * size) as u64)
}

/// The device address of a contiguous CUDA tensor's first element.
fn ptr(t: &Tensor) -> Result<u64> {
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*s else {
        candle_core::bail!("the fused kernels need every tensor on the GPU");
    };
    sptr(cs, l, "fused kernel input")
}

/// A new uninitialised (or zeroed) buffer of `n` elements of `dtype` on `dev`, and its address.
fn alloc(dev: &CudaDevice, dtype: DType, n: usize, zeroed: bool) -> Result<(CudaStorage, u64)> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let stream = dev.cuda_stream();
    macro_rules! go {
        ($t:ty) => {{
            let slice = if zeroed {
                dev.alloc_zeros::<$t>(n)?
            } else {
                unsafe { dev.alloc::<$t>(n)? }
            };
            let p = slice.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(slice, dev.clone()), p)
        }};
    }
    Ok(match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(half::bf16),
        other => candle_core::bail!("fused kernels write f32 or bf16, not {other:?}"),
    })
}

/// Launches the kernel `name` of ternlab's module.
fn launch(dev: &CudaDevice, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    let f = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
    let mut b = f.builder();
    for a in args {
        match a {
            P(p) => b.arg(p),
            I64(v) => b.arg(v),
            I32(v) => b.arg(v),
            U32(v) => b.arg(v),
            F32(v) => b.arg(v),
        };
    }
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// The name of a kernel's f32 or bf16 instance.
fn kernel(base: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => candle_core::bail!("fused kernels take f32 or bf16, not {other:?}"),
    };
    Ok(format!("{base}_{suffix}"))
}

/// Launch shape for one warp per row.
fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u64 * 32).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape for one thread per item.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
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
pub use norm::RmsNorm;
use norm::RmsNormBackW;
pub use ternary::TernaryProjection;
