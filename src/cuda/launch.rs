//! How a kernel is reached: the source families and their NVRTC compilation, the buffers
//! kernels take (`Buf`), the device handle launchers run on (`Gpu`), launch shapes, and the
//! profile of `TERNLAB_PROFILE=1`. The launchers themselves live with their kernels' family.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::{Mutex, OnceLock};

/// One kernel source file (`common.cuh` + the family's `.cu`), compiled with NVRTC into its own
/// module the first time one of its kernels is launched.
pub struct Family {
    module: &'static str,
    source: &'static str,
    /// the virtual architecture NVRTC compiles for (None: its default, or `AMPERE` on a card of
    /// compute capability 8.0 and up)
    arch: Option<&'static str>,
    ptx: OnceLock<std::result::Result<String, String>>,
    /// a family without an architecture, built for `AMPERE`: its module's name (`module` +
    /// `AMPERE_SUFFIX`), made once, and its PTX
    ampere_module: OnceLock<String>,
    ampere: OnceLock<std::result::Result<String, String>>,
}

/// The architecture a family that names none is built for on cards of compute capability 8.0
/// and up: there `common.cuh` rounds to bf16 with the card's conversion instruction, one
/// instruction instead of seven integer ones.
const AMPERE: &str = "compute_80";
const AMPERE_SUFFIX: &str = "_sm80";

impl Family {
    /// The family of `source`; `arch` is the virtual architecture its kernels need (e.g.
    /// "compute_80" for bf16 `mma.sync`; None: NVRTC's default), the driver compiling the PTX
    /// for the card at hand, which must be that architecture or newer.
    pub const fn new(
        module: &'static str,
        source: &'static str,
        arch: Option<&'static str>,
    ) -> Self {
        Self {
            module,
            source,
            arch,
            ptx: OnceLock::new(),
            ampere_module: OnceLock::new(),
            ampere: OnceLock::new(),
        }
    }

    /// The module's name and PTX for a card of compute capability `major`.
    fn for_card(&self, major: i32) -> Result<(&str, &str)> {
        if self.arch.is_none() && major >= 8 {
            let module = self
                .ampere_module
                .get_or_init(|| format!("{}{AMPERE_SUFFIX}", self.module));
            let ptx = self.compiled(&self.ampere, Some(AMPERE), module)?;
            return Ok((module, ptx));
        }
        let ptx = self.compiled(&self.ptx, self.arch, self.module)?;
        Ok((self.module, ptx))
    }

    fn compiled<'a>(
        &self,
        cell: &'a OnceLock<std::result::Result<String, String>>,
        arch: Option<&'static str>,
        module: &str,
    ) -> Result<&'a str> {
        cell.get_or_init(|| {
            let cached = ptx_cache_file(module, self.source, arch);
            if let Some(ptx) = cached
                .as_ref()
                .and_then(|f| std::fs::read_to_string(f).ok())
            {
                return Ok(ptx);
            }
            use candle_core::cuda_backend::cudarc::nvrtc;
            let opts = nvrtc::CompileOptions {
                arch,
                ..Default::default()
            };
            let ptx = nvrtc::compile_ptx_with_opts(self.source, opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling ternlab's {module} kernels: {e}"))?;
            if let Some(f) = cached {
                // (best effort, whole or not at all: another process may be writing it too)
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                let written = f.parent().map(std::fs::create_dir_all).transpose().is_ok()
                    && std::fs::write(&tmp, &ptx).is_ok();
                if !written || std::fs::rename(&tmp, &f).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Ok(ptx)
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }
}

/// Where the PTX of a kernel family is kept between processes, so that NVRTC compiles each
/// source once per machine, not at every start (the driver keeps its own cache of the machine
/// code it makes from PTX): `$TERNLAB_CACHE/ptx/`, else `$XDG_CACHE_HOME/ternlab/ptx/`, else
/// `~/.cache/ternlab/ptx/`, the file named by the family, a hash of its source and NVRTC's
/// version (and the architecture, where the family names one). None when there is no home to
/// put it in or `TERNLAB_CACHE=off`.
fn ptx_cache_file(module: &str, source: &str, arch: Option<&str>) -> Option<std::path::PathBuf> {
    use sha2::{Digest, Sha256};
    let root = match std::env::var_os("TERNLAB_CACHE") {
        Some(v) if v == "off" => return None,
        Some(v) => std::path::PathBuf::from(v),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(v) => std::path::PathBuf::from(v).join("ternlab"),
            None => std::path::PathBuf::from(std::env::var_os("HOME")?)
                .join(".cache")
                .join("ternlab"),
        },
    };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two out-pointers to valid locals.
    let version = unsafe {
        candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
    };
    if version != candle_core::cuda_backend::cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return None;
    }
    let hash = Sha256::digest(source.as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    let arch = arch.map(|a| format!("-{a}")).unwrap_or_default();
    Some(
        root.join("ptx")
            .join(format!("{module}-{hex}{arch}-nvrtc{major}.{minor}.ptx")),
    )
}

/// The family of kernels in `$file` (next to this file), behind the shared header; or in
/// several files, read one after the other (headers of their own first).
macro_rules! family {
    ($module:literal, $file:literal) => {
        $crate::cuda::launch::Family::new(
            $module,
            concat!(include_str!("common.cuh"), include_str!($file)),
            None,
        )
    };
    ($module:literal, [$($file:literal),+]) => {
        $crate::cuda::launch::Family::new(
            $module,
            concat!(include_str!("common.cuh"), $(include_str!($file)),+),
            None,
        )
    };
    ($module:literal, $file:literal, $arch:literal) => {
        $crate::cuda::launch::Family::new(
            $module,
            concat!(include_str!("common.cuh"), include_str!($file)),
            Some($arch),
        )
    };
}
pub(crate) use family;

/// A contiguous buffer on the GPU as a kernel sees it: the address of its first element, its
/// dtype and its shape (for the launchers' checks).
#[derive(Clone, Debug)]
pub struct Buf {
    pub p: u64,
    pub dtype: DType,
    pub dims: Vec<usize>,
}

impl Buf {
    /// A contiguous view of a storage (inside a `CustomOp`).
    pub fn of(s: &CudaStorage, l: &Layout) -> Result<Self> {
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("ternlab's CUDA kernels need contiguous tensors");
        };
        let stream = s.device().cuda_stream();
        let p = match s.dtype() {
            DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
            DType::BF16 => s.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
            DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
            other => candle_core::bail!("ternlab's CUDA kernels do not take {other:?}"),
        };
        Ok(Self {
            p: p + (start * s.dtype().size_in_bytes()) as u64,
            dtype: s.dtype(),
            dims: l.dims().to_vec(),
        })
    }

    /// Elements.
    pub fn n(&self) -> usize {
        self.dims.iter().product()
    }

    /// The size of the last dimension.
    pub fn last(&self) -> usize {
        self.dims.last().copied().unwrap_or(1)
    }

    /// Fails unless this buffer holds `n` elements of `dtype` (`what` names the kernel argument).
    pub fn expect(&self, what: &str, n: usize, dtype: DType) -> Result<()> {
        if self.n() != n || self.dtype != dtype {
            candle_core::bail!(
                "{what}: expected {n} elements of {dtype:?}, got {:?} of {:?}",
                self.dims,
                self.dtype
            );
        }
        Ok(())
    }
}

/// Anything a launcher takes as a buffer: a contiguous CUDA tensor, or a `Buf`.
pub trait AsBuf {
    fn buf(&self) -> Result<Buf>;
}

impl AsBuf for Buf {
    fn buf(&self) -> Result<Buf> {
        Ok(self.clone())
    }
}

impl AsBuf for Tensor {
    fn buf(&self) -> Result<Buf> {
        let (s, l) = self.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*s else {
            candle_core::bail!("ternlab's CUDA kernels need every tensor on the GPU");
        };
        Buf::of(cs, l)
    }
}

/// A new uninitialised buffer of `shape` on the storage's device, for a `CustomOp`'s output.
pub fn alloc(dev: &CudaDevice, dtype: DType, shape: &Shape) -> Result<(CudaStorage, Buf)> {
    let n = shape.elem_count();
    let stream = dev.cuda_stream();
    macro_rules! go {
        ($t:ty) => {{
            // Every launcher writes its whole output.
            let slice = unsafe { dev.alloc::<$t>(n)? };
            let p = slice.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(slice, dev.clone()), p)
        }};
    }
    let (s, p) = match dtype {
        DType::F32 => go!(f32),
        DType::BF16 => go!(half::bf16),
        other => candle_core::bail!("ternlab's CUDA kernels write f32 or bf16, not {other:?}"),
    };
    let buf = Buf {
        p,
        dtype,
        dims: shape.dims().to_vec(),
    };
    Ok((s, buf))
}

/// The GPU a launcher runs on: cuBLAS and kernel launches go to its stream.
#[derive(Clone)]
pub struct Gpu {
    pub(crate) dev: CudaDevice,
    device: Device,
}

impl Gpu {
    pub fn new(dev: &CudaDevice) -> Self {
        Self {
            dev: dev.clone(),
            device: Device::Cuda(dev.clone()),
        }
    }

    /// The GPU of a tensor's device.
    pub fn of(device: &Device) -> Result<Self> {
        match device {
            Device::Cuda(dev) => Ok(Self::new(dev)),
            _ => candle_core::bail!("ternlab's CUDA kernels need a CUDA device"),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A new buffer whose contents are undefined: for outputs a kernel writes in full.
    pub fn empty(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        unsafe { Tensor::empty(shape, dtype, &self.device) }
    }

    /// A new buffer of zeros (for outputs kernels add into).
    pub fn zeros(&self, shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        self.timed("zeros", || Tensor::zeros(shape, dtype, &self.device))
    }

    /// The card's memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        let info = self.dev.cuda_stream().context().mem_get_info();
        Ok(info.w()?.1)
    }

    /// The card's compute capability, (major, minor), asked of the driver once per card (every
    /// launch needs it to pick its family's build).
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        static KNOWN: Mutex<Vec<(usize, (i32, i32))>> = Mutex::new(Vec::new());
        let context = self.dev.cuda_stream().context().clone();
        let ordinal = context.ordinal();
        let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&(_, cc)) = known.iter().find(|(o, _)| *o == ordinal) {
            return Ok(cc);
        }
        let cc = context.compute_capability().w()?;
        known.push((ordinal, cc));
        Ok(cc)
    }

    /// The card's streaming multiprocessors.
    pub fn sm_count(&self) -> Result<usize> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let context = self.dev.cuda_stream().context().clone();
        let n = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        Ok(n.max(1) as usize)
    }

    /// Runs `f`, timed alone under `name` when profiling (`TERNLAB_PROFILE=1`).
    pub fn timed<R>(&self, name: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        if !profiling() {
            return f();
        }
        self.device.synchronize()?;
        let start = std::time::Instant::now();
        let r = f()?;
        self.device.synchronize()?;
        let dt = start.elapsed().as_secs_f64();
        let mut p = PROFILE.lock().expect("profile lock");
        let e = p.entry(name.to_string()).or_default();
        e.0 += dt;
        e.1 += 1;
        Ok(r)
    }

    /// A launch of kernel `base` of `family`, its `dtype` instance (None: the kernel has one).
    pub(crate) fn kernel(
        &self,
        family: &'static Family,
        base: &str,
        dtype: Option<DType>,
        cfg: LaunchConfig,
    ) -> Result<Launch<'_>> {
        let name = match dtype {
            None => base.to_string(),
            Some(DType::F32) => format!("{base}_f32"),
            Some(DType::BF16) => format!("{base}_bf16"),
            Some(other) => {
                candle_core::bail!("{base}: the kernels take f32 or bf16, not {other:?}")
            }
        };
        Ok(Launch {
            gpu: self,
            family,
            name,
            cfg,
            args: Vec::new(),
        })
    }
}

enum Arg {
    P(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
}

/// One kernel launch being put together: its arguments in the kernel's order.
pub(crate) struct Launch<'a> {
    gpu: &'a Gpu,
    family: &'static Family,
    name: String,
    cfg: LaunchConfig,
    args: Vec<Arg>,
}

impl Launch<'_> {
    pub fn buf(mut self, b: &Buf) -> Self {
        self.args.push(Arg::P(b.p));
        self
    }

    /// A pointer argument that may be null.
    pub fn opt(mut self, b: Option<&Buf>) -> Self {
        self.args.push(Arg::P(b.map_or(0, |b| b.p)));
        self
    }

    pub fn i64(mut self, v: usize) -> Self {
        self.args.push(Arg::I64(v as i64));
        self
    }

    pub fn i32(mut self, v: usize) -> Self {
        self.args.push(Arg::I32(v as i32));
        self
    }

    pub fn u32(mut self, v: usize) -> Self {
        self.args.push(Arg::U32(v as u32));
        self
    }

    pub fn f32(mut self, v: f32) -> Self {
        self.args.push(Arg::F32(v));
        self
    }

    /// `bytes` of dynamic shared memory (past the default 48 KiB the kernel is allowed that
    /// much once, before its first launch).
    pub fn smem(mut self, bytes: usize) -> Self {
        self.cfg.shared_mem_bytes = bytes as u32;
        self
    }

    pub fn go(self) -> Result<()> {
        let Self {
            gpu,
            family,
            name,
            cfg,
            args,
        } = self;
        gpu.timed(&name, || {
            let (major, _) = gpu.compute_capability()?;
            let (module, ptx) = family.for_card(major)?;
            let f = gpu.dev.get_or_load_custom_func(&name, module, ptx)?;
            if cfg.shared_mem_bytes > 48 * 1024 {
                allow_shared(&f, cfg.shared_mem_bytes)?;
            }
            // (inside `Side::run`: on the side stream)
            let lane = super::side::current();
            let mut b = match &lane {
                Some(l) => l.stream.launch_builder(&f),
                None => f.builder(),
            };
            for a in &args {
                match a {
                    Arg::P(p) => b.arg(p),
                    Arg::I64(v) => b.arg(v),
                    Arg::I32(v) => b.arg(v),
                    Arg::U32(v) => b.arg(v),
                    Arg::F32(v) => b.arg(v),
                };
            }
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    }
}

/// Allows kernel `f` `bytes` of dynamic shared memory, once per loaded kernel and size (the
/// attribute stays with the function; setting it is no stream work, so it may happen while a
/// stream is being captured).
fn allow_shared(
    f: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    bytes: u32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute as A;
    static DONE: Mutex<Vec<(usize, u32)>> = Mutex::new(Vec::new());
    let key = (f.cu_function() as usize, bytes);
    let mut done = DONE.lock().expect("shared memory lock");
    if !done.contains(&key) {
        f.set_attribute(
            A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
        done.push(key);
    }
    Ok(())
}

/// Launch shape for one warp per row.
pub fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u64 * 32).div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch shape for one thread per item.
pub fn per_item(n: usize) -> LaunchConfig {
    blocks(n.div_ceil(256), 256)
}

/// `per_item(n)` for a kernel that numbers its threads in 32 bits (a 64-bit division on the GPU
/// is a called software routine): an error where `n` threads, in whole blocks, would not fit.
/// `what` says what the threads are for.
pub fn per_item_u32(what: &str, n: usize) -> Result<LaunchConfig> {
    if n.div_ceil(256) * 256 > u32::MAX as usize {
        candle_core::bail!("{what}: {n} threads, more than the kernel numbers in 32 bits");
    }
    Ok(per_item(n))
}

/// `blocks` blocks of `threads` threads.
pub fn blocks(blocks: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `TERNLAB_PROFILE=1`: every kernel, GEMM and copy runs alone (a device sync before and after)
/// and its time is added to a table by name; `ternlab bench` prints it.
pub(crate) fn profiling() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TERNLAB_PROFILE").is_ok_and(|v| v == "1"))
}

type Profile = std::collections::BTreeMap<String, (f64, usize)>;
static PROFILE: Mutex<Profile> = Mutex::new(Profile::new());

/// The profile so far (name -> (seconds, calls)), emptied.
pub fn take_profile() -> Vec<(String, f64, usize)> {
    let mut p = PROFILE.lock().expect("profile lock");
    std::mem::take(&mut *p)
        .into_iter()
        .map(|(k, (s, n))| (k, s, n))
        .collect()
}

/// The `cpu_fwd` of a `CustomOp` with 1 or 2 inputs that only exists on CUDA (callers run the
/// composed version elsewhere, so reaching it is a bug).
macro_rules! cuda_only {
    (1, $what:literal) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(concat!("the fused ", $what, " runs on CUDA only"))
        }
    };
    (2, $what:literal) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!(concat!("the fused ", $what, " runs on CUDA only"))
        }
    };
}
pub(crate) use cuda_only;
