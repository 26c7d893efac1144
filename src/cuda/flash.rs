//! Causal grouped-query attention that never writes the L x L matrix (`flash.cu`): bf16 on
//! tensor cores, FlashAttention-2's forward (online softmax over key tiles, the per-row
//! log-sum-exp kept) and backward (probabilities recomputed from it: keys/values in one kernel
//! and queries in another, no atomics, the two as one launch at short sequences; or, by
//! default from `ATOMIC_DQ_FROM` positions on where the kernels run on `mma.sync`, one pass over
//! keys and values that also adds each block's share of the query gradient into f32 sums
//! atomically). The step uses it for bf16 compute on cards of compute capability 8.0 and newer
//! with a head dim of 32, 64 or 128; elsewhere `causal_attention.rs` (GEMMs and a softmax
//! kernel over the blocked scores) stays.
//! On compute capability 9.0 (H100, H200) the forward and both backwards at head dims 64 and
//! 128 run on the warpgroup MMA (`wgmma`: the tensor cores read their shared operands from
//! swizzled tiles once for four warps), with the same bits as on `mma.sync` (`Flash::gmma`);
//! at head dim 128, from `WARP_SPECIALIZED_FROM` positions on, the backward is one
//! warp-specialized kernel after FlashAttention-3's (`Flash::warp_specialized`).
//!
//! Every tensor is read and written in place through strides (`Rows`): q and its gradient as
//! the step's norm + RoPE kernel lays q out, (B, K, L, R, D); k and its gradient as (B, K, L, D);
//! v and its gradient as the v projection writes them, (B, L, K * D); the output and its
//! gradient in the merged (B, L, H * D) layout of o's projection. So no head transpose is left
//! around attention.

use super::launch::{family, per_item, per_item_u32, AsBuf, Buf, Family, Gpu, Launch};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Result, Tensor};

static KERNELS: Family = family!("ternlab_flash", "flash.cu", "compute_80");
/// The same source for compute capability 9.0 and newer: two f32 atomic adds in one vector
/// reduction (`red.global.add.v2.f32`).
static KERNELS_90: Family = family!("ternlab_flash90", "flash.cu", "compute_90");
/// The same source for compute capability 9.0 itself (H100, H200), whose kernels at head dims
/// 64 and 128 run on the warpgroup MMA (`wgmma`, only in sm_90a code).
static KERNELS_90A: Family = family!("ternlab_flash90a", "flash.cu", "compute_90a");

/// The family built for this card (`gmma`: the sm_90a one where the card takes it).
fn kernels(gpu: &Gpu, gmma: bool) -> Result<&'static Family> {
    Ok(match gpu.compute_capability()? {
        (9, 0) if gmma => &KERNELS_90A,
        (major, _) if major >= 9 => &KERNELS_90,
        _ => &KERNELS,
    })
}

/// Rows of a block (query rows in the forward and the query-side backward, keys in the
/// key/value backward: `FA_BM`, `FA_KB` in flash.cu), 16 for each of its warps.
const BLOCK: usize = 128;
/// Rows of a shared tile of keys (forward, query side) or of query rows (key/value side):
/// `FA_BN`, `FA_QT`.
const TILE: usize = 64;
/// Shared rows are padded by 8 elements (`FA_PAD`).
const PAD: usize = 8;
/// Shared memory of the warp-specialized backward (`FA_WS_SMEM`).
const WS_SMEM: usize = 197_664;

/// Where row i (position i / R, head i % R of its group) of group g (batch g / K, key/value
/// head g % K) starts, in elements: (g / K) * batch + (g % K) * head + (i / R) * pos + (i % R) * D.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub batch: usize,
    pub head: usize,
    pub pos: usize,
}

/// The step's attention at one shape: b sequences of l positions, h query heads on k key/value
/// heads (r = h / k per group) of d.
#[derive(Clone, Copy, Debug)]
pub struct Flash {
    pub b: usize,
    pub k: usize,
    pub r: usize,
    pub l: usize,
    pub d: usize,
    pub scale: f32,
    /// Keys a block of the key/value backward takes: 128, or 64 (four warps); None chooses
    /// (64 where blocks of 128 would be fewer than the card's SMs). `TERNLAB_FLASH_KEYS=64` or
    /// `128` decides for every shape.
    pub key_block: Option<usize>,
    /// Query rows a warp of the forward takes: 32 (the default), or 16 (the earlier kernel,
    /// kept to check the other against and to compare speeds:
    /// `TERNLAB_FLASH_FWD_ROWS=16`).
    pub fwd_rows_per_warp: Option<usize>,
    /// Elements between v's positions (and its gradient's): K * D where v is a tensor of its
    /// own, more where it is the last columns of a fused q/k/v projection's output.
    pub v_stride: usize,
    /// The query gradient from a kernel of its own (`flash_bwd_dq`: the probabilities and dP
    /// computed a second time, no atomic adds, the same bits every run: Some(true)), or from
    /// the key/value kernel's dS through f32 atomic adds (five products instead of the two
    /// kernels' seven, but an f32 buffer to clear and store: Some(false)). None chooses: the
    /// query-side kernel on the warpgroup MMA (`gmma`), else the atomic adds from
    /// `ATOMIC_DQ_FROM` positions. `TERNLAB_FLASH_DQ=kernel` or `atomic` decides for every
    /// length.
    pub dq_kernel: Option<bool>,
    /// Where the key/value backward takes blocks of 64 keys (short sequences) and the query
    /// gradient has its own kernel: both backwards in one launch (`flash_bwd_both_w4`, the same
    /// bits: None or Some(true)), or two (Some(false), also `TERNLAB_FLASH_ONE_LAUNCH=0`).
    pub one_launch: Option<bool>,
    /// On a card of compute capability 9.0, the forward (two row tiles a warp), the query-side
    /// and the key/value backward at head dims 64 and 128 on the warpgroup MMA, their shared
    /// operands read by the tensor cores from swizzled tiles (None or Some(true)); or on
    /// `mma.sync` as on other cards (Some(false), also `TERNLAB_FLASH_GMMA=0`). The same
    /// products over the same tiles in the same order: the same bits.
    pub gmma: Option<bool>,
    /// On the warpgroup MMA at head dim 128, with blocks of 128 keys and `dq_kernel` left open:
    /// the whole backward in one warp-specialized kernel (`flash_bwd_ws_d128`, after
    /// FlashAttention-3's Hopper backward: a producer warpgroup feeds two stages of (q, dO)
    /// tiles through mbarriers; two consumer warpgroups run the key/value kernel's products and
    /// dq = dS k, and add each tile's dq into f32 sums by bulk reductions from shared memory;
    /// five products instead of the two kernels' seven). dk and dv have the key/value kernel's
    /// bits; dq is summed in no fixed order. Some(true) takes it wherever it applies, None from
    /// `WARP_SPECIALIZED_FROM` positions, Some(false) (also `TERNLAB_FLASH_WS=0`) never;
    /// `TERNLAB_FLASH_WS=1` at every length.
    pub warp_specialized: Option<bool>,
}

/// The sequence length from which the backward on `mma.sync` adds the query gradient atomically
/// when `Flash::dq_kernel` leaves it open. Measured on an H200 (bench/RESULTS.md, sixth
/// session), step times with the atomic adds against the query-side kernel: 4 x 4096 229.4
/// against 235.3 ms; 16 x 1024 149.7 against 150.2 (a tie); 4 x 256 15.25 against 14.95 (the
/// clearing and storing of the f32 sums costs more than the two products it saves). On the
/// warpgroup MMA the query-side kernel is the faster at every length (H100, eighth session:
/// 4 x 4096 201.7 against 212.6 ms), and the backward takes it.
pub const ATOMIC_DQ_FROM: usize = 2048;

/// The sequence length from which the backward on the warpgroup MMA takes the warp-specialized
/// kernel when `Flash::warp_specialized` leaves it open. Measured on an H200 (bench/RESULTS.md,
/// fourteenth session, call 7), step times with it against the two kernels: 4 x 4096 183.6 and
/// 183.4 against 189.3 and 189.1 ms; 16 x 1024 137.8 and 137.0 against 135.7 (its f32 query
/// gradient is cleared and converted in two more passes over memory, which cost more than the
/// two products it saves at that length). On an H100 (fifteenth session, calls 9-10): 4 x 4096
/// 188.9 against 194.5 ms; 16 x 1024 144.6 and 145.0 against 140.2 and 140.2 (there the kernel
/// waits on the DRAM: its f32 sums leave L2). 2,048 was not measured.
pub const WARP_SPECIALIZED_FROM: usize = 2048;

impl Flash {
    pub fn new(b: usize, l: usize, (h, k, d): (usize, usize, usize)) -> Self {
        Self {
            b,
            k,
            r: h / k,
            l,
            d,
            scale: 1.0 / (d as f32).sqrt(),
            key_block: std::env::var("TERNLAB_FLASH_KEYS")
                .ok()
                .and_then(|v| v.parse().ok()),
            fwd_rows_per_warp: std::env::var("TERNLAB_FLASH_FWD_ROWS")
                .ok()
                .and_then(|v| v.parse().ok()),
            v_stride: k * d,
            dq_kernel: match std::env::var("TERNLAB_FLASH_DQ").as_deref() {
                Ok("kernel") => Some(true),
                Ok("atomic") => Some(false),
                _ => None,
            },
            one_launch: std::env::var("TERNLAB_FLASH_ONE_LAUNCH")
                .ok()
                .map(|v| v != "0"),
            gmma: std::env::var("TERNLAB_FLASH_GMMA").ok().map(|v| v != "0"),
            warp_specialized: std::env::var("TERNLAB_FLASH_WS").ok().map(|v| v != "0"),
        }
    }

    /// Whether these kernels run this attention: bf16, a head dim of 32, 64 or 128, and a card
    /// of compute capability 8.0 or newer (bf16 `mma.sync`).
    pub fn supported(gpu: &Gpu, dtype: DType, d: usize) -> Result<bool> {
        if dtype != DType::BF16 || ![32, 64, 128].contains(&d) {
            return Ok(false);
        }
        let (major, _) = gpu.compute_capability()?;
        Ok(major >= 8)
    }

    /// q (and its gradient) as the step's norm + RoPE kernel writes it: (B, K, L, R, D).
    pub fn q_rows(&self) -> Rows {
        let (k, r, l, d) = (self.k, self.r, self.l, self.d);
        Rows {
            batch: k * l * r * d,
            head: l * r * d,
            pos: r * d,
        }
    }

    /// k (and its gradient): (B, K, L, D).
    pub fn k_rows(&self) -> Rows {
        let (k, l, d) = (self.k, self.l, self.d);
        Rows {
            batch: k * l * d,
            head: l * d,
            pos: d,
        }
    }

    /// v (and its gradient) as its projection writes it: (B, L, K * D), positions `v_stride`
    /// apart.
    pub fn v_rows(&self) -> Rows {
        let (l, d, s) = (self.l, self.d, self.v_stride);
        Rows {
            batch: l * s,
            head: d,
            pos: s,
        }
    }

    /// The output (and its gradient) with heads merged: (B, L, H * D).
    pub fn o_rows(&self) -> Rows {
        let (k, r, l, d) = (self.k, self.r, self.l, self.d);
        Rows {
            batch: l * k * r * d,
            head: r * d,
            pos: k * r * d,
        }
    }

    /// The kernel family these launches take on this card (`gmma` left open: wgmma where the
    /// card has it).
    fn family(&self, gpu: &Gpu) -> Result<&'static Family> {
        kernels(gpu, self.gmma.unwrap_or(true))
    }

    /// Keys a block of the key/value backward takes on this card (`key_block`, or 64 where
    /// blocks of 128 would be fewer than the card's SMs).
    fn key_block(&self, gpu: &Gpu) -> Result<usize> {
        Ok(match self.key_block {
            Some(keys) if keys == BLOCK || keys == BLOCK / 2 => keys,
            Some(keys) => candle_core::bail!("flash attention: blocks of {keys} keys (64 or 128)"),
            None if self.l.div_ceil(BLOCK) * self.groups() < gpu.sm_count()? => BLOCK / 2,
            None => BLOCK,
        })
    }

    /// Whether `backward` takes the warp-specialized kernel (`warp_specialized`) on this card.
    pub fn warp_specialized_on(&self, gpu: &Gpu) -> Result<bool> {
        Ok(self
            .warp_specialized
            .unwrap_or(self.l >= WARP_SPECIALIZED_FROM)
            && self.dq_kernel.is_none()
            && self.d == 128
            && std::ptr::eq(self.family(gpu)?, &KERNELS_90A)
            && self.key_block(gpu)? == BLOCK)
    }

    fn groups(&self) -> usize {
        self.b * self.k
    }

    /// Query rows of one group, L * R.
    fn rows(&self) -> usize {
        self.l * self.r
    }

    /// Fails unless `x` is bf16 of `n` elements at a 16-byte boundary (the kernels move 16
    /// bytes at a time).
    fn check(&self, what: &str, x: &Buf, n: usize) -> Result<()> {
        x.expect(&format!("flash attention: {what}"), n, DType::BF16)?;
        if !x.p.is_multiple_of(16) {
            candle_core::bail!("flash attention: {what} does not start at a 16-byte boundary");
        }
        Ok(())
    }

    fn check_shape(&self) -> Result<()> {
        if self.v_stride < self.k * self.d || !self.v_stride.is_multiple_of(8) {
            candle_core::bail!(
                "flash attention: v's positions {} elements apart (at least K * D = {}, a \
                 multiple of 8)",
                self.v_stride,
                self.k * self.d
            );
        }
        if ![32, 64, 128].contains(&self.d) || self.k == 0 || self.r == 0 {
            candle_core::bail!(
                "flash attention: head dim {} with {} key/value heads: needs a head dim of 32, 64 or 128",
                self.d,
                self.k
            );
        }
        if self.groups() > 65535 || self.rows() > i32::MAX as usize {
            candle_core::bail!(
                "flash attention: {} sequences x {} key/value heads is past the grid",
                self.b,
                self.k
            );
        }
        Ok(())
    }

    /// Bytes of one shared tile of `TILE` rows (a block's rows take two).
    fn tile(&self) -> usize {
        TILE * (self.d + PAD) * 2
    }

    /// Blocks of `block` rows (`per_warp` a warp) over `items` rows of each group.
    fn grid(&self, items: usize, block: usize, per_warp: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (items.div_ceil(block) as u32, self.groups() as u32, 1),
            block_dim: ((block / per_warp * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Checks the buffers every kernel reads: q, k, v, o (bf16, 16-byte aligned) and lse (f32).
    fn check_io(&self, [q, k, v, o]: [&Buf; 4], lse: &Buf) -> Result<()> {
        self.check_shape()?;
        let nq = self.groups() * self.rows() * self.d;
        let nkv = self.groups() * self.l * self.d;
        self.check("q", q, nq)?;
        self.check("k", k, nkv)?;
        self.check("v", v, nkv)?;
        self.check("o", o, nq)?;
        let n = self.groups() * self.rows();
        lse.expect("flash attention: lse", n, DType::F32)
    }

    /// `flash_fwd2_d{D}(q, k, v, o, lse, nk, r, l, q strides, k strides, v strides, o strides,
    /// sl2)`: o = causal softmax(scale * q k^T) v in the merged layout, and lse (B * K, L * R)
    /// f32, each row's log-sum-exp of `scale * log2(e) * q k^T` in base 2. Four warps of 32 rows
    /// a block; with `fwd_rows_per_warp` = Some(16), `flash_fwd_d{D}` (eight warps of 16 rows:
    /// the same bits, slower).
    pub fn forward(
        &self,
        gpu: &Gpu,
        (q, k, v): (&impl AsBuf, &impl AsBuf, &impl AsBuf),
        o: &impl AsBuf,
        lse: &impl AsBuf,
    ) -> Result<()> {
        let (q, k, v, o, lse) = (q.buf()?, k.buf()?, v.buf()?, o.buf()?, lse.buf()?);
        self.check_io([&q, &k, &v, &o], &lse)?;
        let sixteen = match self.fwd_rows_per_warp {
            None | Some(32) => false,
            Some(16) => true,
            Some(n) => candle_core::bail!("flash attention: {n} rows a warp (16 or 32)"),
        };
        // (16 rows a warp: two buffers of (k, v) tiles; 32: the block's q rows besides them)
        let (name, per_warp, smem) = if sixteen {
            (format!("flash_fwd_d{}", self.d), 16, 4 * self.tile())
        } else {
            (format!("flash_fwd2_d{}", self.d), 32, 6 * self.tile())
        };
        let grid = self.grid(self.rows(), BLOCK, per_warp);
        let launch = gpu.kernel(self.family(gpu)?, &name, None, grid)?.smem(smem);
        let launch = [&q, &k, &v, &o, &lse]
            .into_iter()
            .fold(launch, |a, b| a.buf(b))
            .i32(self.k)
            .i32(self.r)
            .i32(self.l);
        self.io_strides(launch, [])
            .f32(self.scale * std::f32::consts::LOG2_E)
            .go()
    }

    /// The gradients (dq, dk) in q's and k's layouts from the output o, the forward's lse, and
    /// the output's gradient `dout` (merged layout, as o); dv written into `dv` in v's layout
    /// (positions `v_stride` apart).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        gpu: &Gpu,
        (q, k, v): (&Tensor, &Tensor, &impl AsBuf),
        o: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        dv: &impl AsBuf,
    ) -> Result<(Tensor, Tensor)> {
        let (groups, rows, d) = (self.groups(), self.rows(), self.d);
        let (qb, kb, vb, ob, lb, db) = (
            q.buf()?,
            k.buf()?,
            v.buf()?,
            o.buf()?,
            lse.buf()?,
            dout.buf()?,
        );
        self.check_io([&qb, &kb, &vb, &ob], &lb)?;
        self.check("the output's gradient", &db, ob.n())?;
        let dvb = dv.buf()?;
        self.check("dv", &dvb, vb.n())?;
        let dq = gpu.empty(q.shape(), DType::BF16)?;
        let dk = gpu.empty(k.shape(), DType::BF16)?;
        let delta = gpu.empty((groups, rows), DType::F32)?;
        let (dqb, dkb, deb) = (dq.buf()?, dk.buf()?, delta.buf()?);
        let family = self.family(gpu)?;

        // delta = rowsum(dO * O), eight values a thread (numbered in 32 bits)
        let threads = per_item_u32("flash_delta", groups * rows * (d / 8))?;
        let launch = gpu.kernel(family, "flash_delta", None, threads)?;
        let launch = launch
            .buf(&ob)
            .buf(&db)
            .buf(&deb)
            .i64(groups * rows)
            .i32(self.k)
            .i32(self.r)
            .i32(self.l)
            .i32(d);
        strides(strides(launch, self.o_rows()), self.o_rows()).go()?;

        // `flash_bwd_{dkdv,dkdvq,dq}_d{D}(q, k, v, dout, lse, delta, outputs.., nk, r, l, q, k,
        // v and dout strides, the outputs' strides, sl2, scale)`
        let tile = self.tile();
        let launch_in =
            |kernel: &str, grid, smem, outputs: &[Option<&Buf>], at: &[Rows]| -> Result<_> {
                let name = format!("flash_bwd_{kernel}_d{d}");
                let launch = gpu.kernel(family, &name, None, grid)?.smem(smem);
                let inputs = [&qb, &kb, &vb, &db, &lb, &deb].into_iter();
                let launch = outputs
                    .iter()
                    .fold(inputs.fold(launch, |a, b| a.buf(b)), |a, b| a.opt(*b))
                    .i32(self.k)
                    .i32(self.r)
                    .i32(self.l);
                Ok(self
                    .io_strides(launch, at.iter().copied())
                    .f32(self.scale * std::f32::consts::LOG2_E)
                    .f32(self.scale))
            };
        let backward =
            |kernel: &str, (items, block), smem, outputs: &[Option<&Buf>], at: &[Rows]| {
                launch_in(kernel, self.grid(items, block, 16), smem, outputs, at)?.go()
            };
        // Blocks of BLOCK keys, or of half as many (`_w4`, four warps) where that leaves SMs
        // idle (short sequences: 4 x 256 of Qwen3-0.6B is 64 blocks of 128 keys); each holds its
        // keys and values, two buffers of (q, dO) tiles with their rows' lse, delta and
        // position, and (adding the query gradient) two tiles of dS.
        let keys = self.key_block(gpu)?;
        let w4 = if keys == BLOCK { "" } else { "_w4" };
        let kv_smem = (2 * keys / TILE + 4) * tile + 2 * 3 * TILE * 4;
        let kv_rows = [self.k_rows(), self.v_rows()];
        // (the head dims flash.cu's flash_bwd_kv and flash_bwd_q put on wgmma)
        let on_gmma = std::ptr::eq(family, &KERNELS_90A) && d >= 64;
        if self.warp_specialized_on(gpu)? {
            // the query gradient's f32 sums: per group, tiles of TILE rows (the last one
            // padded), each in the order the kernel's consumers hold it
            let tiles = rows.div_ceil(TILE);
            if tiles * TILE * d / 16 > i32::MAX as usize {
                candle_core::bail!("flash attention: {rows} query rows a group is past the grid");
            }
            let acc = gpu.zeros((groups * tiles * TILE, d), DType::F32)?;
            let accb = acc.buf()?;
            // (blockIdx.x the group, y the key block: every group's first keys, which see the
            // most query rows, start first)
            let grid = LaunchConfig {
                grid_dim: (groups as u32, self.l.div_ceil(BLOCK) as u32, 1),
                block_dim: (384, 1, 1),
                shared_mem_bytes: 0,
            };
            // (flash.cu's FA_WS_SMEM from a 1024-byte boundary)
            let outputs = [Some(&dkb), Some(&dvb), Some(&accb)];
            launch_in("ws", grid, WS_SMEM + 1024, &outputs, &kv_rows)?.go()?;
            // four float4 of the sums a thread, blockIdx.y the group
            let per_group = tiles * TILE * d / 16;
            let grid = LaunchConfig {
                grid_dim: (per_group.div_ceil(256) as u32, groups as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let launch = gpu.kernel(family, "flash_dq_store_ws", None, grid)?;
            let launch = launch
                .buf(&accb)
                .buf(&dqb)
                .i32(tiles)
                .i32(self.k)
                .i32(self.r)
                .i32(self.l);
            strides(launch, self.q_rows()).f32(self.scale).go()?;
            return Ok((dq, dk));
        }
        if !self.dq_kernel.unwrap_or(on_gmma || self.l < ATOMIC_DQ_FROM) {
            // the query gradient's f32 sums
            let acc = gpu.zeros((groups * rows, d), DType::F32)?;
            let accb = acc.buf()?;
            backward(
                &format!("dkdvq{w4}"),
                (self.l, keys),
                kv_smem + 2 * keys * (TILE + PAD) * 2,
                &[Some(&dkb), Some(&dvb), Some(&accb)],
                &kv_rows,
            )?;
            let launch = gpu.kernel(
                family,
                "flash_dq_store",
                None,
                per_item(groups * rows * (d / 8)),
            )?;
            let launch = launch
                .buf(&accb)
                .buf(&dqb)
                .i64(groups * rows)
                .i32(self.k)
                .i32(self.r)
                .i32(self.l)
                .i32(d);
            strides(launch, self.q_rows()).f32(self.scale).go()?;
            return Ok((dq, dk));
        }
        if keys < BLOCK && self.one_launch.unwrap_or(true) {
            // Both in one launch, four warps a block: blocks of 64 keys, then blocks of 64 query
            // rows (their q and dO rows and two buffers of (k, v) tiles, no more shared memory
            // than the key/value side's).
            let nkv = self.l.div_ceil(keys);
            let grid = LaunchConfig {
                grid_dim: (((nkv + rows.div_ceil(64)) * groups) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let at = [self.q_rows(), self.k_rows(), self.v_rows()];
            let outputs = [Some(&dqb), Some(&dkb), Some(&dvb)];
            launch_in("both_w4", grid, kv_smem, &outputs, &at)?
                .i32(nkv)
                .i32(groups)
                .go()?;
            return Ok((dq, dk));
        }
        // The query-side kernel (the block's q and dO rows, and two buffers of (k, v) tiles)
        // on the side stream beside the key/value one: neither reads what the other writes,
        // and at short sequences each leaves most of the card idle. (Everything they use lives
        // until the join.)
        let mut side = super::side::Side::new(gpu)?;
        side.run(&[], || {
            backward(
                "dq",
                (rows, BLOCK),
                8 * tile,
                &[Some(&dqb)],
                &[self.q_rows()],
            )
        })?;
        backward(
            &format!("dkdv{w4}"),
            (self.l, keys),
            kv_smem,
            &[Some(&dkb), Some(&dvb), None],
            &kv_rows,
        )?;
        side.join()?;
        Ok((dq, dk))
    }

    /// The strides of q, k, v and the output (or its gradient), then of `more`.
    fn io_strides<'a>(
        &self,
        launch: Launch<'a>,
        more: impl IntoIterator<Item = Rows>,
    ) -> Launch<'a> {
        [self.q_rows(), self.k_rows(), self.v_rows(), self.o_rows()]
            .into_iter()
            .chain(more)
            .fold(launch, strides)
    }
}

/// A tensor's three strides as the kernels take them (i64: batch, head, position).
fn strides(launch: Launch<'_>, s: Rows) -> Launch<'_> {
    launch.i64(s.batch).i64(s.head).i64(s.pos)
}
