//! `run.device`: "auto" picks CUDA, then Metal, then the CPU, among what this build supports.

use candle_core::Device;

/// `run.device` as written: "auto", "cpu", "cuda", "cuda:N" or "metal".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    /// "cuda:N", or `None` for "cuda" (card 0): kept apart so that a spec is written back as
    /// it was written.
    Cuda(Option<usize>),
    Metal,
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal => f.write_str("metal"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    /// The error says what would be right (the spec reader adds the file and the key).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let want = "expected \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"";
        let s =
            <String as serde::Deserialize>::deserialize(d).map_err(|_| D::Error::custom(want))?;
        match s.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            "metal" => Ok(DeviceChoice::Metal),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(Some(n))),
                _ => Err(D::Error::custom(format!("{s:?}: {want}"))),
            },
        }
    }
}

/// Fails when this build cannot use the chosen device (without touching the device).
pub fn check_built(choice: DeviceChoice) -> anyhow::Result<()> {
    let feature = match choice {
        DeviceChoice::Cuda(_) if !candle_core::utils::cuda_is_available() => "cuda",
        DeviceChoice::Metal if !candle_core::utils::metal_is_available() => "metal",
        _ => return Ok(()),
    };
    anyhow::bail!(
        "this ternlab was built without {feature}: build with \
         `cargo build --release --features {feature}`"
    )
}

/// Opens the device (and names it for reports: "cpu", "cuda:0", "metal"), with a message
/// naming the cargo feature when the build lacks it.
pub fn open(choice: DeviceChoice) -> anyhow::Result<(Device, String)> {
    let device = open_device(choice)?;
    let name = match (&device, choice) {
        (Device::Cuda(_), DeviceChoice::Cuda(n)) => format!("cuda:{}", n.unwrap_or(0)),
        (Device::Cuda(_), _) => "cuda:0".into(),
        (Device::Metal(_), _) => "metal".into(),
        (Device::Cpu, _) => "cpu".into(),
    };
    Ok((device, name))
}

fn open_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => {
            check_built(choice)?;
            let n = n.unwrap_or(0);
            let device = Device::new_cuda(n)?;
            keep_freed_device_memory(n)?;
            no_event_tracking(&device);
            Ok(device)
        }
        DeviceChoice::Metal => {
            check_built(choice)?;
            Ok(Device::new_metal(0)?)
        }
        DeviceChoice::Auto => {
            if candle_core::utils::cuda_is_available() {
                let device = Device::new_cuda(0)?;
                keep_freed_device_memory(0)?;
                no_event_tracking(&device);
                Ok(device)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

/// candle allocates with `cuMemAllocAsync` from the device's default memory pool, whose
/// release threshold is 0: at every synchronisation the pool hands freed memory back to the
/// driver, and the next step maps it again (tens of GiB a step for Qwen3-0.6B). Keeping it in
/// the pool makes those allocations cheap; the memory stays reserved for this process.
#[cfg(feature = "cuda")]
fn keep_freed_device_memory(ordinal: usize) -> anyhow::Result<()> {
    set_pool_attribute(
        ordinal,
        cuda_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        u64::MAX,
    )
}

/// cudarc gives every buffer two CUDA events, to order its uses across streams; ternlab runs a
/// device's work on candle's one stream, but for the backward's side stream, which orders its
/// work with events of its own and keeps what it uses alive until the main stream has waited
/// for it (`crate::cuda::side`), so making them is host time per allocation (thousands a step)
/// spent for nothing.
fn no_event_tracking(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: buffers are allocated and freed on candle's stream only; the side stream's
        // uses are ordered by `crate::cuda::side` (see above).
        unsafe { d.disable_event_tracking() }
    }
    let _ = device;
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_device_memory(_ordinal: usize) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::sys as cuda_sys;

/// The driver's handle of card `ordinal`.
#[cfg(feature = "cuda")]
fn cu_device(
    ordinal: usize,
) -> Result<cuda_sys::CUdevice, candle_core::cuda_backend::cudarc::driver::DriverError> {
    let mut dev: cuda_sys::CUdevice = 0;
    // SAFETY: a plain driver query into a valid local.
    unsafe { cuda_sys::cuDeviceGet(&mut dev, ordinal as i32) }.result()?;
    Ok(dev)
}

#[cfg(feature = "cuda")]
fn default_pool(ordinal: usize) -> anyhow::Result<cuda_sys::CUmemoryPool> {
    let dev = cu_device(ordinal)?;
    // SAFETY: a plain driver query; the out-pointer is a valid local.
    unsafe {
        let mut pool: cuda_sys::CUmemoryPool = std::ptr::null_mut();
        cuda_sys::cuDeviceGetDefaultMemPool(&mut pool, dev).result()?;
        Ok(pool)
    }
}

#[cfg(feature = "cuda")]
fn set_pool_attribute(
    ordinal: usize,
    attr: cuda_sys::CUmemPool_attribute,
    value: u64,
) -> anyhow::Result<()> {
    let pool = default_pool(ordinal)?;
    let mut value = value;
    // SAFETY: the attributes set here take a u64, which outlives the call.
    unsafe { cuda_sys::cuMemPoolSetAttribute(pool, attr, (&mut value as *mut u64).cast()) }
        .result()?;
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_ordinal(device: &Device) -> Option<usize> {
    match device {
        Device::Cuda(d) => Some(d.cuda_stream().context().ordinal()),
        _ => None,
    }
}

/// Starts a new high watermark of the device memory in use (CUDA; a no-op elsewhere).
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda_ordinal(device) {
        let attr = cuda_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let _ = set_pool_attribute(n, attr, 0);
        let attr = cuda_sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        let mut zero: u64 = 0;
        // SAFETY: resetting the graph memory high watermark takes a u64 that is 0.
        let _ = cu_device(n).and_then(|dev| unsafe {
            cuda_sys::cuDeviceSetGraphMemAttribute(dev, attr, (&mut zero as *mut u64).cast())
                .result()
        });
    }
    let _ = device;
}

/// The most device memory in use at once since `reset_peak_memory` (allocated from the pool,
/// like PyTorch's `max_memory_allocated`; what the pool keeps cached is not counted). None off
/// CUDA. What the training step's CUDA graphs allocate comes from memory of their own:
/// `graph_memory_bytes`.
pub fn peak_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda_ordinal(device) {
        let pool = default_pool(n).ok()?;
        let mut value: u64 = 0;
        let attr = cuda_sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: USED_MEM_HIGH is a u64 read into a valid local.
        unsafe { cuda_sys::cuMemPoolGetAttribute(pool, attr, (&mut value as *mut u64).cast()) }
            .result()
            .ok()?;
        return Some(value);
    }
    let _ = device;
    None
}

/// The most memory that CUDA graphs (the replayed training step) had allocated at once since
/// `reset_peak_memory`; None off CUDA.
pub fn graph_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda_ordinal(device) {
        let mut graphs: u64 = 0;
        let attr = cuda_sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH;
        let dev = cu_device(n).ok()?;
        // SAFETY: USED_MEM_HIGH is a u64 read into a valid local.
        unsafe {
            cuda_sys::cuDeviceGetGraphMemAttribute(dev, attr, (&mut graphs as *mut u64).cast())
        }
        .result()
        .ok()?;
        return Some(graphs);
    }
    let _ = device;
    None
}

/// Hands the memory that the pool, and the CUDA graphs' memory, keep but nothing uses back to
/// the driver (CUDA; after a device sync). Before a step is captured in a CUDA graph, whose
/// allocations come from memory of their own, so that the eager steps' activations are not
/// reserved twice; and after graphs are dropped, for the eager steps that follow.
pub fn trim_memory_pool(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(n) = cuda_ordinal(device) {
        if device.synchronize().is_ok() {
            if let Ok(pool) = default_pool(n) {
                // SAFETY: a pool handle from the driver.
                let _ = unsafe { cuda_sys::cuMemPoolTrimTo(pool, 0) };
            }
            // SAFETY: a device handle from the driver.
            let _ = cu_device(n)
                .and_then(|dev| unsafe { cuda_sys::cuDeviceGraphMemTrim(dev) }.result());
        }
    }
    let _ = device;
}
