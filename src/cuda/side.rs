//! A second stream beside candle's, for work that nothing on the main stream waits for right
//! away: the backward's weight-gradient GEMMs (and flash attention's query-side kernel), which
//! at small batches leave most of the card idle and can run beside the input-gradient chain.
//!
//! Work goes to the side stream inside `Side::run`, which first makes the side stream wait for
//! everything enqueued on the main stream so far and returns a `Ticket` for the work. candle
//! allocates and frees on the main stream only, so what side work reads and writes must be
//! allocated before `run` (ordered by that wait), and must not be freed or overwritten by main
//! work until the main stream has waited for the ticket: `Side` keeps the tensors it is handed
//! alive until then (`wait`), and `join` waits for all of it.
//!
//! The side stream is used only where candle's per-buffer event tracking is off (ternlab's
//! devices: `crate::device`), and never inside a CUDA graph capture (see `Side::new`), while
//! profiling (`TERNLAB_PROFILE=1` times each launch alone on the main stream) or with
//! `TERNLAB_SIDE_STREAM=0`; elsewhere `run` runs its work on the main stream.

use super::launch::{profiling, Gpu};
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Tensor};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A device's side stream and the cuBLAS handle bound to it.
pub struct Lane {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: Arc<CudaBlas>,
}

thread_local! {
    /// The lane that launches on this thread go to, inside `Side::run`.
    static CURRENT: RefCell<Option<Arc<Lane>>> = const { RefCell::new(None) };
}

/// The lane launches go to now (None: the main stream).
pub(crate) fn current() -> Option<Arc<Lane>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The side lane of `gpu`'s context, made once; None where the side stream is not used.
fn lane(gpu: &Gpu) -> Result<Option<Arc<Lane>>> {
    static OFF: OnceLock<bool> = OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("TERNLAB_SIDE_STREAM").is_ok_and(|v| v == "0"));
    if off || profiling() || gpu.dev.is_event_tracking() {
        return Ok(None);
    }
    static LANES: Mutex<Option<HashMap<usize, Arc<Lane>>>> = Mutex::new(None);
    let main = gpu.dev.cuda_stream();
    let key = Arc::as_ptr(main.context()) as usize;
    let mut lanes = LANES.lock().expect("side lanes lock");
    let lanes = lanes.get_or_insert_with(HashMap::new);
    if let Some(l) = lanes.get(&key) {
        return Ok(Some(l.clone()));
    }
    let stream = main.context().new_stream().w()?;
    let blas = CudaBlas::new(stream.clone())
        .map_err(|e| candle_core::Error::Msg(format!("cuBLAS handle: {e:?}")))?;
    let l = Arc::new(Lane {
        stream,
        blas: Arc::new(blas),
    });
    lanes.insert(key, l.clone());
    Ok(Some(l))
}

/// Work enqueued on the side stream: the main stream waits for it with `Side::wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(usize);

/// The side stream of one pass (see the module's doc).
pub struct Side {
    gpu: Gpu,
    lane: Option<Arc<Lane>>,
    /// per ticket not yet waited for: the event after its work, and what the work uses
    pending: Vec<(Ticket, CudaEvent, Vec<Tensor>)>,
    next: usize,
}

impl Side {
    /// The side stream of a pass about to be enqueued on `gpu`'s main stream; inside a CUDA
    /// graph capture, the main stream itself (measured on an H100, a captured 4 x 256 step with
    /// the side stream's branches took 17.1 ms against 16.5 ms without them; launch by launch,
    /// 16 x 1024 gains 1%).
    pub fn new(gpu: &Gpu) -> Result<Self> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus as S;
        let main = gpu.dev.cuda_stream();
        let capturing = main.capture_status().w()? != S::CU_STREAM_CAPTURE_STATUS_NONE;
        Ok(Self {
            gpu: gpu.clone(),
            lane: if capturing { None } else { lane(gpu)? },
            pending: Vec::new(),
            next: 0,
        })
    }

    /// Runs `f`'s launches on the side stream after everything enqueued on the main stream so
    /// far; `uses` (every tensor the work reads or writes) stays alive until the main stream
    /// has waited for the ticket.
    pub fn run(&mut self, uses: &[&Tensor], f: impl FnOnce() -> Result<()>) -> Result<Ticket> {
        let ticket = Ticket(self.next);
        self.next += 1;
        let Some(lane) = self.lane.clone() else {
            f()?;
            return Ok(ticket);
        };
        let main = self.gpu.dev.cuda_stream();
        lane.stream.join(&main).w()?;
        CURRENT.with(|c| *c.borrow_mut() = Some(lane.clone()));
        let r = f();
        CURRENT.with(|c| *c.borrow_mut() = None);
        r?;
        let done = lane.stream.record_event(None).w()?;
        let uses = uses.iter().map(|t| (*t).clone()).collect();
        self.pending.push((ticket, done, uses));
        Ok(ticket)
    }

    /// The main stream waits for `ticket`'s work (and so for all side work before it); what
    /// that work used may be freed.
    pub fn wait(&mut self, ticket: Ticket) -> Result<()> {
        let Some(i) = self.pending.iter().position(|(t, ..)| *t >= ticket) else {
            return Ok(()); // waited for already
        };
        if self.pending[i].0 != ticket {
            return Ok(()); // an earlier wait covered it
        }
        let main = self.gpu.dev.cuda_stream();
        main.wait(&self.pending[i].1).w()?;
        self.pending.drain(..=i);
        Ok(())
    }

    /// The main stream waits for all side work so far.
    pub fn join(&mut self) -> Result<()> {
        match self.pending.last() {
            Some((t, ..)) => self.wait(*t),
            None => Ok(()),
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // (what the side work uses must outlive it: a pass that ends early still waits)
        if !self.pending.is_empty() {
            let _ = self.join();
        }
    }
}
