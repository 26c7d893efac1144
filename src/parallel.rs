//! One run data-parallel over the GPUs of a host (`run.devices = N`), through NVIDIA's NCCL
//! (cargo feature `nccl`).
//!
//! The run's process is rank 0 on the spec's device (`cuda:k`); it starts ranks 1..N as child
//! processes (`ternlab rank <run folder>`, on `cuda:k+r`), which read the run's resolved
//! config.toml, build the same model from the same weights and draw the same batches. Every
//! rank takes its `B / N` rows of each batch; after the backward pass the gradients are
//! averaged over the ranks (one all-reduce per parameter, grouped), and so is the loss; every
//! rank then makes the same AdamW update, so the replicas stay equal. The mean of the ranks'
//! mean losses over equal shares is the mean over the whole batch, so the curve is the one-GPU
//! curve of the same global batch up to the order of float sums. Rank 0 alone evaluates, saves
//! and writes results; the others wait for it at their next all-reduce.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

/// The environment variables that tell a child process its place (set by rank 0).
pub const RANK_VAR: &str = "TERNLAB_RANK";
pub const WORLD_VAR: &str = "TERNLAB_WORLD";
pub const ID_VAR: &str = "TERNLAB_NCCL_ID";
/// The checkpoint rank 0 resumes from, if any (so that every rank loads the same one).
pub const RESUME_VAR: &str = "TERNLAB_RESUME_FROM";

/// This process's rank among `world` and its NCCL communicator.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    #[cfg(feature = "nccl")]
    comm: nccl::Comm,
}

impl Group {
    /// A new NCCL id (rank 0), as the hex that the children get in `ID_VAR`.
    pub fn new_id() -> Result<String> {
        #[cfg(feature = "nccl")]
        {
            nccl::new_id()
        }
        #[cfg(not(feature = "nccl"))]
        {
            anyhow::bail!("{}", no_nccl())
        }
    }

    /// Joins the group `id` as `rank` of `world` on `device` (blocks until every rank joined).
    pub fn join(id: &str, rank: usize, world: usize, device: &candle_core::Device) -> Result<Self> {
        #[cfg(feature = "nccl")]
        {
            Ok(Self {
                rank,
                world,
                comm: nccl::Comm::join(id, rank, world, device)?,
            })
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (id, rank, world, device);
            anyhow::bail!("{}", no_nccl())
        }
    }

    /// This rank's rows of a batch: `[rank * B / N, (rank + 1) * B / N)`.
    pub fn shard(&self, t: &Tensor) -> Result<Tensor> {
        let b = t.dim(0)?;
        anyhow::ensure!(
            b % self.world == 0,
            "a batch of {b} does not split over {} GPUs",
            self.world
        );
        let n = b / self.world;
        Ok(t.narrow(0, self.rank * n, n)?.contiguous()?)
    }

    /// Averages `tensors` (each contiguous, on this rank's GPU) over the ranks, in place.
    pub fn average(&self, tensors: &[&Tensor]) -> Result<()> {
        #[cfg(feature = "nccl")]
        {
            self.comm.average(tensors)
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = tensors;
            anyhow::bail!("{}", no_nccl())
        }
    }

    /// Averages every gradient of `grads` over the ranks, in place, in the order of `vars` (the
    /// same on every rank). A bf16 gradient (a projection's from bf16 products, a bf16
    /// parameter's) is widened first, so that the ranks' gradients are summed in f32, as
    /// NCCL's bf16 sum would round at every hop of its ring.
    pub fn average_grads(&self, grads: &mut GradStore, vars: &[candle_core::Var]) -> Result<()> {
        for v in vars {
            if let Some(g) = grads.get(v) {
                if g.dtype() == DType::BF16 {
                    let wide = g.to_dtype(DType::F32)?;
                    grads.insert(v, wide);
                }
            }
        }
        let present: Vec<&Tensor> = vars.iter().filter_map(|v| grads.get(v)).collect();
        self.average(&present)
    }
}

/// Fails unless cards `first .. first + world` exist (before any rank starts: a rank that
/// cannot open its card would otherwise leave the others waiting to meet it).
pub fn check_cards(first: usize, world: usize) -> Result<()> {
    #[cfg(feature = "nccl")]
    {
        let n = cudarc::driver::CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("counting CUDA devices: {e:?}"))? as usize;
        anyhow::ensure!(
            first + world <= n,
            "run.devices = {world} from cuda:{first} needs cuda:{first}..cuda:{}, but this machine \
             has {n} CUDA device(s)",
            first + world - 1
        );
        Ok(())
    }
    #[cfg(not(feature = "nccl"))]
    {
        let _ = (first, world);
        anyhow::bail!("{}", no_nccl())
    }
}

/// Ends this process when the process that started it (rank 0) is gone, however it went: a
/// rank left alone would wait in its next all-reduce forever, holding its GPU.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("rank 0 is gone: this rank stops");
            std::process::exit(1);
        }
    });
}

#[cfg(not(feature = "nccl"))]
fn no_nccl() -> &'static str {
    "run.devices > 1 needs a build with NCCL: cargo build --release --features cuda,nccl"
}

/// The rank, world and group id of a child rank, from its environment (None in rank 0).
pub fn from_env() -> Result<Option<(usize, usize, String)>> {
    let Ok(rank) = std::env::var(RANK_VAR) else {
        return Ok(None);
    };
    let num = |v: &str, name: &str| -> Result<usize> {
        v.parse()
            .with_context(|| format!("{name}={v:?} is not a number"))
    };
    let world = std::env::var(WORLD_VAR).with_context(|| format!("{WORLD_VAR} is not set"))?;
    let id = std::env::var(ID_VAR).with_context(|| format!("{ID_VAR} is not set"))?;
    Ok(Some((num(&rank, RANK_VAR)?, num(&world, WORLD_VAR)?, id)))
}

#[cfg(feature = "nccl")]
mod nccl {
    use crate::cuda::launch::AsBuf;
    use anyhow::{Context, Result};
    use candle_core::{DType, Tensor};
    use cudarc::nccl::{result, sys};

    pub fn new_id() -> Result<String> {
        let id = result::get_uniqueid().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
        Ok(id
            .internal
            .iter()
            .map(|&c| format!("{:02x}", c as u8))
            .collect())
    }

    fn parse_id(hex: &str) -> Result<sys::ncclUniqueId> {
        let mut internal = [0 as std::ffi::c_char; 128];
        anyhow::ensure!(
            hex.len() == 256,
            "an NCCL id is 256 hex digits, got {}",
            hex.len()
        );
        for (i, c) in internal.iter_mut().enumerate() {
            let byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .with_context(|| format!("NCCL id {hex:?}"))?;
            *c = byte as std::ffi::c_char;
        }
        Ok(sys::ncclUniqueId { internal })
    }

    pub struct Comm {
        comm: sys::ncclComm_t,
        stream: sys::cudaStream_t,
        aborted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    /// Aborts a communicator from another thread (the rank-0 watchdog): NCCL operations in
    /// flight on it fail instead of waiting for a peer that is gone.
    pub struct Aborter {
        comm: usize,
        aborted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Aborter {
        pub fn abort(&self) {
            if !self.aborted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                unsafe {
                    let _ = result::comm_abort(self.comm as sys::ncclComm_t);
                }
            }
        }
    }

    // (the communicator is used from the thread that made it; the raw pointers are opaque
    // handles owned by NCCL)
    unsafe impl Send for Comm {}
    unsafe impl Sync for Comm {}

    impl Comm {
        pub fn join(
            id: &str,
            rank: usize,
            world: usize,
            device: &candle_core::Device,
        ) -> Result<Self> {
            let candle_core::Device::Cuda(dev) = device else {
                anyhow::bail!("data parallelism needs CUDA devices");
            };
            let id = parse_id(id)?;
            // NCCL works on candle's stream, after the kernels queued before it.
            let stream = dev.cuda_stream().cu_stream() as sys::cudaStream_t;
            dev.cuda_stream()
                .context()
                .bind_to_thread()
                .map_err(|e| anyhow::anyhow!("binding the CUDA context: {e:?}"))?;
            let mut comm = std::mem::MaybeUninit::uninit();
            unsafe {
                result::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32).map_err(
                    |e| anyhow::anyhow!("ncclCommInitRank (rank {rank} of {world}): {e:?}"),
                )?;
                Ok(Self {
                    comm: comm.assume_init(),
                    stream,
                    aborted: Default::default(),
                })
            }
        }

        pub fn aborter(&self) -> Aborter {
            Aborter {
                comm: self.comm as usize,
                aborted: self.aborted.clone(),
            }
        }

        pub fn average(&self, tensors: &[&Tensor]) -> Result<()> {
            anyhow::ensure!(
                !self.aborted.load(std::sync::atomic::Ordering::SeqCst),
                "the data-parallel group was aborted"
            );
            result::group_start().map_err(|e| anyhow::anyhow!("ncclGroupStart: {e:?}"))?;
            let mut failed = None;
            for t in tensors {
                let buf = t.buf()?;
                let dtype = match buf.dtype {
                    DType::F32 => sys::ncclDataType_t::ncclFloat32,
                    DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
                    other => anyhow::bail!("all-reduce of {other:?}"),
                };
                let p = buf.p as *mut std::ffi::c_void;
                let r = unsafe {
                    result::all_reduce(
                        p,
                        p,
                        buf.n(),
                        dtype,
                        sys::ncclRedOp_t::ncclAvg,
                        self.comm,
                        self.stream,
                    )
                };
                if let Err(e) = r {
                    failed = Some(e);
                    break;
                }
            }
            result::group_end().map_err(|e| anyhow::anyhow!("ncclGroupEnd: {e:?}"))?;
            match failed {
                Some(e) => anyhow::bail!("ncclAllReduce: {e:?}"),
                None => Ok(()),
            }
        }
    }

    impl Drop for Comm {
        // ncclCommDestroy waits for every rank to destroy its own communicator, so a rank 0
        // that waits for its ranks to exit before it drops its own would never return; each
        // rank aborts its communicator instead, which frees it without waiting for the others
        // (as cudarc's own `Comm` does).
        fn drop(&mut self) {
            self.aborter().abort();
        }
    }
}

/// The child ranks of a data-parallel run, watched from rank 0: a rank that dies aborts the
/// group, so that rank 0 fails its run with the rank's exit status instead of waiting forever
/// in an all-reduce. Dropped, it kills the ranks still running.
pub struct Ranks {
    children: std::sync::Arc<std::sync::Mutex<Vec<std::process::Child>>>,
    died: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Ranks {
    /// Starts ranks 1..world of the run in `run_dir` (`ternlab rank`), in group `id`, resuming
    /// from `resume` when given.
    pub fn spawn(
        run_dir: &std::path::Path,
        world: usize,
        id: &str,
        resume: Option<&std::path::Path>,
    ) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        for rank in 1..world {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("rank")
                .arg(run_dir)
                .env(RANK_VAR, rank.to_string())
                .env(WORLD_VAR, world.to_string())
                .env(ID_VAR, id)
                .env_remove(RESUME_VAR)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            if let Some(r) = resume {
                cmd.env(RESUME_VAR, r);
            }
            children.push(
                cmd.spawn()
                    .with_context(|| format!("starting rank {rank} ({})", exe.display()))?,
            );
        }
        Ok(Self {
            children: std::sync::Arc::new(std::sync::Mutex::new(children)),
            died: Default::default(),
            done: Default::default(),
            watchdog: None,
        })
    }

    /// Joins group `id` as rank 0 on `device` while watching the ranks: one that exits before
    /// the group is complete fails this call instead of leaving it waiting. (The thread that
    /// waits in NCCL's init is then left behind, blocked.)
    pub fn join(&mut self, id: &str, world: usize, device: &candle_core::Device) -> Result<Group> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (id, device) = (id.to_string(), device.clone());
        std::thread::spawn(move || {
            let _ = tx.send(Group::join(&id, 0, world, &device));
        });
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(group) => return group,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("joining the data-parallel group: the thread panicked")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            let mut cs = self.children.lock().unwrap_or_else(|e| e.into_inner());
            for (i, c) in cs.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    anyhow::bail!("rank {} exited before joining the group: {status}", i + 1);
                }
            }
        }
    }

    /// Watches the ranks from now on: the first to exit with a failure aborts `group`.
    pub fn watch(&mut self, group: &Group) {
        let (children, died, done) = (self.children.clone(), self.died.clone(), self.done.clone());
        #[cfg(feature = "nccl")]
        let abort = group.comm.aborter();
        #[cfg(not(feature = "nccl"))]
        let _ = group;
        self.watchdog = Some(std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let mut cs = children.lock().unwrap_or_else(|e| e.into_inner());
                for (i, c) in cs.iter_mut().enumerate() {
                    if let Ok(Some(status)) = c.try_wait() {
                        if !status.success() {
                            *died.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(format!("rank {} died: {status}", i + 1));
                            #[cfg(feature = "nccl")]
                            abort.abort();
                            return;
                        }
                    }
                }
            }
        }));
    }

    /// Why the group was aborted, if a rank died.
    pub fn died(&self) -> Option<String> {
        self.died.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After training: waits for the ranks to exit (`completed`), else stops them.
    pub fn finish(mut self, completed: bool) -> Result<()> {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        if let Some(why) = self.died() {
            anyhow::bail!("{why}");
        }
        let mut cs = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for (i, c) in cs.iter_mut().enumerate() {
            if !completed {
                let _ = c.kill();
            }
            let status = c.wait()?;
            anyhow::ensure!(
                !completed || status.success(),
                "rank {} ended with {status}",
                i + 1
            );
        }
        cs.clear();
        Ok(())
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut cs = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for c in cs.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
