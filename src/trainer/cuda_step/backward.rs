//! The backward pass: every parameter's gradient from the tape, layer by layer in reverse.
//! The weights' gradients (GEMMs that nothing after them in the pass reads) run on the side
//! stream (`crate::cuda::side`) beside the chain of input gradients; the main stream waits for
//! one before it overwrites what the GEMM reads (the residual stream's gradient), or before
//! anything reads its result (learned scales' gradients, the embedding's), and for all of them
//! at the end.

use super::{Attention, Dims, Gate, Kept, Qkv, Tape};
use crate::cuda::attention::TokenRows;
use crate::cuda::flash::Flash;
use crate::cuda::gemm::{linear_back_w_into, linear_back_x};
use crate::cuda::side::{Side, Ticket};
use crate::cuda::AsBuf;
use crate::cuda::{attention, embedding, mlp, norm};
use crate::model::{Linear, Qwen3, RmsNorm};
use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

/// The gradient of the mean loss for every parameter of `model` (f32, keyed like autograd's).
pub fn backward(model: &Qwen3, tape: Tape) -> Result<GradStore> {
    let Tape {
        ctx,
        dims,
        ids,
        attn,
        rope,
        mut layers,
        x_last,
        xf,
        head,
        dlogits,
    } = tape;
    let gpu = &ctx.gpu;
    let mut side = Side::new(gpu)?;
    // `linear_back_w` on the side stream (dw allocated first, on the main one), into a dw of
    // `dtype`: a projection's in the products' dtype (autograd's gradient of a bf16 product's
    // weight is bf16, rounded once from the f32 sums as here; AdamW widens it as it reads it),
    // the head's as the embedding's below.
    let back_w = |side: &mut Side, dy: &Tensor, x: &Tensor, dtype| -> Result<(Tensor, Ticket)> {
        let dw = gpu.empty((dy.dim(1)?, x.dim(1)?), dtype)?;
        let t = side.run(&[dy, x, &dw], || linear_back_w_into(gpu, dy, x, &dw))?;
        Ok((dw, t))
    };
    // a projection's weight gradient recorded; learned scales read it at once
    let record =
        |side: &mut Side, grads: &mut GradStore, lin: &Linear, (dw, t): (Tensor, Ticket)| {
            if lin.scale.is_some() {
                side.wait(t)?;
            }
            ctx.weight_grad(grads, lin, dw)
        };
    let Dims {
        b,
        l,
        n,
        e,
        vocab,
        h,
        k,
        d,
        r,
    } = dims;
    let seed_first_norm = ctx.cd == DType::F32 && model.embed_tokens.dtype() == DType::BF16;
    let mut grads = GradStore::default();
    // Every norm weight's gradient (f32) is added into a part of one buffer, zeroed once.
    let norm_dws = NormGrads::new(gpu, model)?;

    // Output head and final norm. A bf16 embedding under bf16 compute (the checkpoint's, as
    // Qwen3 ships) gets its gradient in bf16, as autograd's is: a tied head's product rounded
    // once, then each token's rows of the input gradient summed in f32 and added once (the
    // same bits every run); otherwise in f32, the rows added atomically. An untied head is a
    // product's weight like the projections.
    let emb_bf16 = ctx.cd == DType::BF16 && model.embed_tokens.dtype() == DType::BF16;
    let head_dtype = match (&model.lm_head, emb_bf16) {
        (Some(_), _) => ctx.cd,
        (None, true) => DType::BF16,
        (None, false) => DType::F32,
    };
    let dxf = ctx.act((n, e))?;
    linear_back_x(gpu, &dlogits, &head, &dxf, 0.)?;
    let (dhead, _) = back_w(&mut side, &dlogits, &xf, head_dtype)?;
    drop((dlogits, head, xf));
    // dx: the residual stream's gradient (N, E), written by the final norm, then added to.
    let dx = ctx.act((n, e))?;
    let dw = ctx.rms_norm_back(&x_last, &model.norm, (&dxf, &dx), false, norm_dws.next(e)?)?;
    grads.insert(&model.norm.weight, dw);
    drop((dxf, x_last));

    for (i, layer) in model.layers.iter().enumerate().rev() {
        let t = layers.pop().expect("one tape per layer");
        let (at, mlp_) = (&layer.self_attn, &layer.mlp);
        let [wq, wk, wv, wo, wg, wu, wd] = &t.w;

        // MLP: next = h + down(silu(g) * u)
        let (gate, up) = (&mlp_.gate_proj, &mlp_.up_proj);
        let f = gate.weight.dim(0)?;
        let da = ctx.act((n, f))?;
        linear_back_x(gpu, &dx, wd, &da, 0.)?;
        let down_in = t.a.of(&mlp_.down_proj);
        let down = back_w(&mut side, &dx, down_in, ctx.cd)?;
        let reads_dx = down.1;
        record(&mut side, &mut grads, &mlp_.down_proj, down)?;
        let dxn2 = ctx.act((n, e))?;
        match &t.gate {
            Gate::Fused { gu, w } => {
                // one (N, 2F) gradient, one GEMM each way; each weight's gradient is its rows
                let dgu = ctx.act((n, 2 * f))?;
                mlp::silu_mul_halves_back(gpu, gu, &da, &dgu)?;
                drop(da);
                linear_back_x(gpu, &dgu, w, &dxn2, 0.)?;
                let (dw, t) = back_w(&mut side, &dgu, t.xn2.of(gate), ctx.cd)?;
                record(&mut side, &mut grads, gate, (dw.narrow(0, 0, f)?, t))?;
                record(&mut side, &mut grads, up, (dw.narrow(0, f, f)?, t))?;
            }
            Gate::Split { g, u } => {
                let (dg, du) = (ctx.act((n, f))?, ctx.act((n, f))?);
                mlp::silu_mul_back(gpu, g, u, &da, &dg, &du)?;
                drop(da);
                linear_back_x(gpu, &dg, wg, &dxn2, 0.)?;
                linear_back_x(gpu, &du, wu, &dxn2, 1.)?;
                let dw = back_w(&mut side, &dg, t.xn2.of(gate), ctx.cd)?;
                record(&mut side, &mut grads, gate, dw)?;
                let dw = back_w(&mut side, &du, t.xn2.of(up), ctx.cd)?;
                record(&mut side, &mut grads, up, dw)?;
            }
        }
        let post = &layer.post_attention_layernorm;
        side.wait(reads_dx)?; // (down's weight gradient reads dx, which this adds into)
        let dw = ctx.rms_norm_back(&t.h, post, (&dxn2, &dx), true, norm_dws.next(e)?)?;
        grads.insert(&post.weight, dw);
        drop(dxn2);

        // Attention: h = x + o(attention(norm(x)))
        let dmerged = ctx.act((n, h * d))?;
        linear_back_x(gpu, &dx, wo, &dmerged, 0.)?;
        let o_in = t.merged.of(&at.o_proj);
        let o = back_w(&mut side, &dx, o_in, ctx.cd)?;
        let reads_dx = o.1;
        record(&mut side, &mut grads, &at.o_proj, o)?;
        // One (N, qd + 2 kd) gradient of the fused q/k/v output, which attention's backward
        // (dv) and the q/k norm + RoPE's (dq, dk) write into; else one of each.
        let dqkv = match &t.proj {
            Qkv::Fused { qkv, .. } => Some(ctx.act(qkv.shape())?),
            Qkv::Split { .. } => None,
        };
        let out = |i: usize, width: usize| -> Result<(Option<Tensor>, TokenRows)> {
            Ok(match &dqkv {
                Some(all) => {
                    let at = [0, h * d, h * d + k * d][i];
                    (None, TokenRows::columns(all, at, width)?)
                }
                None => {
                    let t = ctx.act((n, width))?;
                    let rows = TokenRows::packed(t.buf()?, width);
                    (Some(t), rows)
                }
            })
        };
        let (dv_own, dv_rows) = out(2, k * d)?;
        let (dqr, dkr) = match (&attn, &t.kept) {
            (Attention::Flash(fl), Kept::Flash { lse }) => {
                let o = &t.merged.x;
                let v = t.proj.v_rows()?;
                let fl = Flash {
                    v_stride: v.stride,
                    ..*fl
                };
                let qkv = (&t.qr, &t.kr, &v.buf);
                fl.backward(gpu, qkv, o, lse, &dmerged, &dv_rows.buf)?
            }
            (Attention::Blocked(ca), Kept::Blocked { vt, probs }) => {
                let datt = ctx.swap_axes(&dmerged, (b, l, k, r * d))?;
                let probs = match probs {
                    Some(p) => p.clone(),
                    None => ca.probs(gpu, &t.qr, &t.kr)?,
                };
                let (dqr, dkr, dvt) = ca.backward(gpu, (&t.qr, &t.kr, vt), &probs, &datt)?;
                drop((probs, datt));
                let dv = dv_own.as_ref().expect("split under blocked attention");
                crate::cuda::attention::swap_axes(gpu, &dvt, dv, (b, k, l, d))?;
                (dqr, dkr)
            }
            _ => candle_core::bail!("a layer kept another attention's tape"),
        };
        drop(dmerged);
        // q/k norm + RoPE, backward: (B, heads / group, L, group, D) -> (N, heads * D); q's
        // and k's in one launch where they are columns of the fused q/k/v gradient.
        let tables = (&rope.cos, &rope.sin);
        let parts = [(&dqr, &at.q_norm, h, r), (&dkr, &at.k_norm, k, 1)];
        let weight = |nrm: &RmsNorm| ctx.norm_weight_for(nrm, attention::takes_bf16_weight(d));
        let [dq, dk] = match &t.proj {
            Qkv::Split { q, k: kx, .. } => {
                let mut one = |i: usize| -> Result<Option<Tensor>> {
                    let (dy, nrm, heads, group) = parts[i];
                    let (dxt, _) = out(i, heads * d)?;
                    let dxt = dxt.expect("split q/k/v gradients are tensors of their own");
                    let x = [q, kx][i];
                    let (rg, eps, dw) = ((heads, group), nrm.eps as f32, norm_dws.next(d)?);
                    let w = weight(nrm)?;
                    let dw =
                        attention::rope_norm_back(gpu, dy, x, &w, tables, &dxt, rg, eps, Some(dw))?;
                    grads.insert(&nrm.weight, dw);
                    Ok(Some(dxt))
                };
                [one(0)?, one(1)?]
            }
            Qkv::Fused { .. } => {
                let (xs, dxs) = (
                    [t.proj.part(0)?, t.proj.part(1)?],
                    [out(0, h * d)?.1, out(1, k * d)?.1],
                );
                let ws = [weight(&at.q_norm)?, weight(&at.k_norm)?];
                let dws = [norm_dws.next(d)?, norm_dws.next(d)?];
                let set = |i: usize| {
                    let (dy, nrm, heads, group) = parts[i];
                    attention::RopeBack {
                        dy,
                        x: &xs[i],
                        w: &ws[i],
                        dx: &dxs[i],
                        heads,
                        group,
                        eps: nrm.eps as f32,
                        dw: &dws[i],
                    }
                };
                attention::rope_norm_back_pair(gpu, [set(0), set(1)], tables)?;
                let [dwq, dwk] = dws;
                grads.insert(&at.q_norm.weight, dwq);
                grads.insert(&at.k_norm.weight, dwk);
                [None, None]
            }
        };
        drop((dqr, dkr));
        let dxn1 = ctx.act((n, e))?;
        match (&t.proj, &dqkv) {
            (Qkv::Fused { w, qd, kd, .. }, Some(dqkv)) => {
                // one GEMM each way; each weight's gradient is its rows of the fused one's
                linear_back_x(gpu, dqkv, w, &dxn1, 0.)?;
                let (dw, tk) = back_w(&mut side, dqkv, t.xn1.of(&at.q_proj), ctx.cd)?;
                let (qd, kd) = (*qd, *kd);
                record(
                    &mut side,
                    &mut grads,
                    &at.q_proj,
                    (dw.narrow(0, 0, qd)?, tk),
                )?;
                record(
                    &mut side,
                    &mut grads,
                    &at.k_proj,
                    (dw.narrow(0, qd, kd)?, tk),
                )?;
                let dv = dw.narrow(0, qd + kd, kd)?;
                record(&mut side, &mut grads, &at.v_proj, (dv, tk))?;
            }
            _ => {
                let (Some(dq), Some(dk), Some(dv)) = (dq, dk, dv_own) else {
                    candle_core::bail!("split q/k/v gradients missing");
                };
                linear_back_x(gpu, &dq, wq, &dxn1, 0.)?;
                linear_back_x(gpu, &dk, wk, &dxn1, 1.)?;
                linear_back_x(gpu, &dv, wv, &dxn1, 1.)?;
                for (lin, dy) in [(&at.q_proj, &dq), (&at.k_proj, &dk), (&at.v_proj, &dv)] {
                    let dw = back_w(&mut side, dy, t.xn1.of(lin), ctx.cd)?;
                    record(&mut side, &mut grads, lin, dw)?;
                }
            }
        }
        drop(dqkv);
        let ln = &layer.input_layernorm;
        side.wait(reads_dx)?; // (o's weight gradient reads dx, which this adds into)
        let dw = norm_dws.next(e)?;
        let dw = if i == 0 && seed_first_norm {
            let w = ctx.norm_weight(ln)?;
            norm::bf16_rounded_back(gpu, &t.x, &w, ln.eps as f32, &dxn1, &dx)?
        } else {
            ctx.rms_norm_back(&t.x, ln, (&dxn1, &dx), true, dw)?
        };
        grads.insert(&ln.weight, dw);
    }

    // Every weight gradient done (the head's, which the embedding's adds into when tied).
    side.join()?;
    // Embedding: the rows of the tokens seen get their input gradient, added to the head's
    // gradient when the head is tied.
    let demb = match &model.lm_head {
        Some(lm_head) => {
            grads.insert(lm_head, dhead);
            gpu.zeros((vocab, e), if emb_bf16 { DType::BF16 } else { DType::F32 })?
        }
        None => dhead,
    };
    if emb_bf16 {
        embedding::embed_back_rows(gpu, &dx, &ids, &demb)?;
    } else {
        embedding::embed_back(gpu, &dx, &ids, &demb)?;
    }
    grads.insert(&model.embed_tokens, demb);
    Ok(grads)
}

/// One zeroed f32 buffer for the gradients of every norm weight of the model (the final norm,
/// and each layer's input, post-attention, q and k norms), handed out in parts that start
/// 16-byte aligned (as the fused AdamW reads gradients): one memset a step instead of one per
/// norm.
struct NormGrads {
    all: Tensor,
    used: std::cell::Cell<usize>,
}

impl NormGrads {
    fn new(gpu: &crate::cuda::Gpu, model: &Qwen3) -> Result<Self> {
        let (e, d) = (model.cfg.hidden_size, model.cfg.head_dim);
        let (e, d) = (e.next_multiple_of(4), d.next_multiple_of(4));
        let n = e + model.layers.len() * 2 * (e + d);
        Ok(Self {
            all: gpu.zeros(n, DType::F32)?,
            used: std::cell::Cell::new(0),
        })
    }

    /// The next `len` values (contiguous, zeroed).
    fn next(&self, len: usize) -> Result<Tensor> {
        let at = self.used.get();
        self.used.set(at + len.next_multiple_of(4));
        self.all.narrow(0, at, len)
    }
}
