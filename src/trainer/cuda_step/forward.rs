//! The forward pass and the loss, keeping what the backward needs (`Tape`).

use super::{
    gate_up_fused, qkv_fused, Attention, Ctx, Dims, Gate, Kept, LayerTape, Qkv, Tape, Terms,
};
use crate::cuda::attention::TokenRows;
use crate::cuda::causal_attention::CausalAttention;
use crate::cuda::flash::Flash;
use crate::cuda::gemm::linear;
use crate::cuda::loss::{cross_entropy, distill_kl, Grad};
use crate::cuda::{attention, embedding, mlp, norm, AsBuf, Gpu};
use crate::model::{Qwen3, RmsNorm, Rope};
use crate::trainer::{Distill, StepOptions};
use candle_core::{DType, Result, Tensor};

/// Forward pass and loss of one batch, ids and targets (B, L): the mean token cross-entropy
/// (f32 scalar) and the tape for `backward`.
pub fn forward(
    model: &Qwen3,
    opts: &StepOptions,
    ids: &Tensor,
    targets: &Tensor,
    distill: Option<&Distill>,
) -> Result<(Terms, Tape)> {
    let rope = Rope::new(&model.cfg, ids.dim(1)?, &model.device)?;
    forward_with(model, opts, ids, targets, distill, rope, None)
}

/// `TERNLAB_FLASH_ATTENTION=0` (or `1`): the step's attention when the trainer leaves it open
/// (`Trainer::with_flash_attention`), for comparing the two on one binary.
fn flash_from_env() -> Option<bool> {
    match std::env::var("TERNLAB_FLASH_ATTENTION").ok()?.as_str() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Every layer's attention probabilities, kept for the backward, may take a quarter of the
/// card; past that, each layer's are recomputed in the backward (one more score GEMM and
/// softmax per layer, the same values).
pub(super) fn recompute_attention(model: &Qwen3, gpu: &Gpu, b: usize, l: usize) -> bool {
    let h = model.cfg.num_attention_heads;
    let stored = model.layers.len() * b * h * l * l * model.compute_dtype.size_in_bytes();
    stored > gpu.total_memory().unwrap_or(usize::MAX) / 4
}

/// Whether the step runs flash attention: where its kernels take the compute dtype, head dim
/// and card, unless `opts` (or `TERNLAB_FLASH`) say otherwise; an error where they ask for it
/// and it cannot run.
pub(super) fn uses_flash(model: &Qwen3, opts: &StepOptions, gpu: &Gpu) -> Result<bool> {
    let (cd, d) = (model.compute_dtype, model.cfg.head_dim);
    let can_flash = Flash::supported(gpu, cd, d)?;
    Ok(match opts.flash_attention.or_else(flash_from_env) {
        Some(true) if !can_flash => candle_core::bail!(
            "flash attention needs bf16 compute, a head dim of 32, 64 or 128 and a card of \
             compute capability 8.0 or newer (here {cd:?}, head dim {d})"
        ),
        Some(on) => on,
        None => can_flash,
    })
}

/// `forward` with the rotary tables of the batch's length made beforehand (a captured step
/// must not copy from the host).
pub(super) fn forward_with(
    model: &Qwen3,
    opts: &StepOptions,
    ids: &Tensor,
    targets: &Tensor,
    distill: Option<&Distill>,
    rope: Rope,
    prepared: Option<std::sync::Arc<super::prepared::Prepared>>,
) -> Result<(Terms, Tape)> {
    let ctx = Ctx {
        gpu: Gpu::of(&model.device)?,
        cd: model.compute_dtype,
        norm_f32: Default::default(),
        prepared,
    };
    let cfg = &model.cfg;
    let (b, l) = ids.dims2()?;
    let dims = Dims::new(cfg, b, l);
    let Dims {
        n, e, h, k, d, r, ..
    } = dims;
    let ids = ids.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let targets = targets.flatten_all()?.to_dtype(DType::U32)?.contiguous()?;
    let use_flash = uses_flash(model, opts, &ctx.gpu)?;
    let attn = if use_flash {
        let fl = Flash::new(b, l, (h, k, d));
        Attention::Flash(Flash {
            dq_kernel: opts.flash_dq_kernel.or(fl.dq_kernel),
            ..fl
        })
    } else {
        Attention::Blocked(CausalAttention::new(b, l, (h, k, d), opts.attention_chunk))
    };
    let recompute = opts
        .attention_recompute
        .unwrap_or_else(|| recompute_attention(model, &ctx.gpu, b, l));

    let emb = &model.embed_tokens;
    // Under f32 compute a bf16 embedding's rows enter the first layer in bf16, as in the seed
    // (MLX): its input norm rounds to bf16 (see `model::ops::rms_norm_composed`).
    let seed_first_norm = ctx.cd == DType::F32 && emb.dtype() == DType::BF16;
    let mut x = if emb.dtype() == DType::F32 {
        let x = ctx.act((n, e))?;
        embedding::embed(&ctx.gpu, emb, &ids, &x)?;
        x
    } else {
        // A bf16 embedding (the checkpoint's): gather its rows, then the compute dtype.
        ctx.gpu.timed("embed gather", || {
            emb.detach().index_select(&ids, 0)?.to_dtype(ctx.cd)
        })?
    };

    // q (N, heads * D) -> (B, heads / group, L, group, D) normalised and rotated: q with
    // group = R, k with group = 1 (see `CausalAttention`); both in one launch where the kernel
    // allows.
    let norm_rope = |[qx, kx]: [&TokenRows; 2], [qn, kn]: [&RmsNorm; 2]| -> Result<[Tensor; 2]> {
        let y = [ctx.act((b * k, l * r, d))?, ctx.act((b * k, l, d))?];
        let weight = |n_| ctx.norm_weight_for(n_, attention::takes_bf16_weight(d));
        let w = [weight(qn)?, weight(kn)?];
        let (wq, wk, yq, yk) = (w[0].buf()?, w[1].buf()?, y[0].buf()?, y[1].buf()?);
        let set = |x, w, y, heads, group, n_: &RmsNorm| attention::RopeRows {
            x,
            w,
            y,
            heads,
            group,
            eps: n_.eps as f32,
        };
        let sets = [set(qx, &wq, &yq, h, r, qn), set(kx, &wk, &yk, k, 1, kn)];
        attention::norm_rope_pair(&ctx.gpu, sets, (&rope.cos, &rope.sin))?;
        Ok(y)
    };

    let mut layers = Vec::with_capacity(model.layers.len());
    // The norm after each layer's residual sum, made with it (`Ctx::add_rms_norm`).
    let mut next_norm = None;
    for (i, layer) in model.layers.iter().enumerate() {
        let (at, mlp_) = (&layer.self_attn, &layer.mlp);
        // Gate and up take the same input unless only one quantizes its activations: then
        // their weights are one (2F, E) matrix and their products one GEMM (wider than F: a
        // better fit for the card at small batches); `w` keeps each one's rows.
        let (gate, up) = (&mlp_.gate_proj, &mlp_.up_proj);
        let f = gate.weight.dim(0)?;
        let kept = ctx.prepared.as_ref().and_then(|p| p.gate_up(i).cloned());
        let wgu = if let Some(kept) = kept {
            Some(kept)
        } else if gate_up_fused(gate, up) {
            let wgu = ctx.act((2 * f, gate.weight.dim(1)?))?;
            ctx.weight_into(gate, &wgu, 0)?;
            ctx.weight_into(up, &wgu, f)?;
            Some(wgu)
        } else {
            None
        };
        let (wg, wu) = match &wgu {
            Some(wgu) => (wgu.narrow(0, 0, f)?, wgu.narrow(0, f, f)?),
            None => (ctx.weight(gate)?, ctx.weight(up)?),
        };
        // q, k and v likewise, as one (H * D + 2 * K * D, E) matrix, where flash attention
        // runs (see `qkv_fused`).
        let (qd, kd) = (h * d, k * d);
        let wqkv = if qkv_fused(at, use_flash, d) {
            match ctx.prepared.as_ref().and_then(|p| p.qkv(i).cloned()) {
                Some(kept) => Some(kept),
                None => {
                    let w = ctx.act((qd + 2 * kd, at.q_proj.weight.dim(1)?))?;
                    ctx.weight_into(&at.q_proj, &w, 0)?;
                    ctx.weight_into(&at.k_proj, &w, qd)?;
                    ctx.weight_into(&at.v_proj, &w, qd + kd)?;
                    Some(w)
                }
            }
        } else {
            None
        };
        let (wq, wk, wv) = match &wqkv {
            Some(w) => (
                w.narrow(0, 0, qd)?,
                w.narrow(0, qd, kd)?,
                w.narrow(0, qd + kd, kd)?,
            ),
            None => (
                ctx.weight(&at.q_proj)?,
                ctx.weight(&at.k_proj)?,
                ctx.weight(&at.v_proj)?,
            ),
        };
        let w = [
            wq,
            wk,
            wv,
            ctx.weight(&at.o_proj)?,
            wg,
            wu,
            ctx.weight(&mlp_.down_proj)?,
        ];
        let xn1 = if let Some(xn1) = next_norm.take() {
            xn1
        } else if i == 0 && seed_first_norm {
            let ln = &layer.input_layernorm;
            let w = ctx.norm_weight(ln)?;
            norm::bf16_rounded(&ctx.gpu, &x, &w, ln.eps as f32)?
        } else {
            ctx.rms_norm(&x, &layer.input_layernorm)?
        };
        // Attention: h = x + o(attention(norm(x)))
        let xn1 = ctx.input(xn1, &[&at.q_proj, &at.k_proj, &at.v_proj])?;
        let mut proj = match wqkv {
            Some(w) => Qkv::Fused {
                qkv: linear(&ctx.gpu, xn1.of(&at.q_proj), &w)?,
                w,
                qd,
                kd,
            },
            None => Qkv::Split {
                q: linear(&ctx.gpu, xn1.of(&at.q_proj), &w[0])?,
                k: linear(&ctx.gpu, xn1.of(&at.k_proj), &w[1])?,
                v: Some(linear(&ctx.gpu, xn1.of(&at.v_proj), &w[2])?),
            },
        };
        let [qr, kr] = norm_rope([&proj.q_rows()?, &proj.k_rows()?], [&at.q_norm, &at.k_norm])?;
        let (merged, kept) = match &attn {
            Attention::Flash(fl) => {
                let merged = ctx.act((n, h * d))?;
                let lse = ctx.gpu.empty((b * k, l * r), DType::F32)?;
                let v = proj.v_rows()?;
                let fl = Flash {
                    v_stride: v.stride,
                    ..*fl
                };
                fl.forward(&ctx.gpu, (&qr, &kr, &v.buf), &merged, &lse)?;
                (merged, Kept::Flash { lse })
            }
            Attention::Blocked(ca) => {
                // (v itself is not kept: its backward reads vt)
                let Qkv::Split { v: Some(v), .. } = &mut proj else {
                    candle_core::bail!("q, k and v fused without flash attention");
                };
                let vt = ctx.swap_axes(v, (b, l, k, d))?;
                if let Qkv::Split { v, .. } = &mut proj {
                    *v = None;
                }
                let (probs, att) = ca.forward(&ctx.gpu, &qr, &kr, &vt)?;
                let merged = ctx.swap_axes(&att, (b, k, l, r * d))?.reshape((n, h * d))?;
                let probs = (!recompute).then_some(probs);
                (merged, Kept::Blocked { vt, probs })
            }
        };
        let merged = ctx.input(merged, &[&at.o_proj])?;
        let o = linear(&ctx.gpu, merged.of(&at.o_proj), &w[3])?;
        let (hres, xn2) = ctx.add_rms_norm(&x, &o, &layer.post_attention_layernorm)?;
        // MLP: next = h + down(silu(gate(norm(h))) * up(norm(h)))
        let xn2 = ctx.input(xn2, &[gate, up])?;
        let a = ctx.act((n, f))?;
        let gate_kept = match wgu {
            Some(w) => {
                let gu = linear(&ctx.gpu, xn2.of(gate), &w)?;
                mlp::silu_mul_halves(&ctx.gpu, &gu, &a)?;
                Gate::Fused { gu, w }
            }
            None => {
                let g = linear(&ctx.gpu, xn2.of(gate), &w[4])?;
                let u = linear(&ctx.gpu, xn2.of(up), &w[5])?;
                mlp::silu_mul(&ctx.gpu, &g, &u, &a)?;
                Gate::Split { g, u }
            }
        };
        let a = ctx.input(a, &[&mlp_.down_proj])?;
        let down = linear(&ctx.gpu, a.of(&mlp_.down_proj), &w[6])?;
        // (with the next layer's input norm, or the final norm, in the same pass)
        let following = match model.layers.get(i + 1) {
            Some(nl) => &nl.input_layernorm,
            None => &model.norm,
        };
        let (next, normed) = ctx.add_rms_norm(&hres, &down, following)?;
        next_norm = Some(normed);
        layers.push(LayerTape {
            w,
            x,
            xn1,
            proj,
            qr,
            kr,
            kept,
            merged,
            h: hres,
            xn2,
            gate: gate_kept,
            a,
        });
        x = next;
    }

    // Final norm, head, loss: the loss kernel overwrites the logits with their gradient.
    let xf = match next_norm {
        Some(xf) => xf,
        None => ctx.rms_norm(&x, &model.norm)?,
    };
    let head = model.lm_head.as_ref().unwrap_or(&model.embed_tokens);
    let head = ctx
        .gpu
        .timed("cast head", || head.detach().to_dtype(ctx.cd))?;
    let logits = linear(&ctx.gpu, &xf, &head)?;
    // Distillation: the KL kernel reads the student's logits and overwrites (a copy of) the
    // teacher's with its term's gradient, which the loss kernel then adds to its own.
    let kl = match distill {
        None => None,
        Some(dst) => {
            let vocab = logits.dim(1)?;
            // A buffer of our own (the kernel overwrites it): the cast makes one, else a copy.
            let t = dst.teacher_logits.reshape(((), vocab))?;
            let t = ctx.gpu.timed("teacher logits", || {
                if t.dtype() == ctx.cd {
                    t.copy()
                } else {
                    t.to_dtype(ctx.cd)
                }
            })?;
            let rows = ctx.gpu.empty(n, DType::F32)?;
            distill_kl(&ctx.gpu, &logits, &t, &rows, dst.temperature, dst.weight)?;
            let kl = ctx.gpu.timed("loss mean", || rows.mean_all())?;
            Some((t, kl, dst.weight))
        }
    };
    let rows = ctx.gpu.empty(n, DType::F32)?;
    let plus = kl.as_ref().map(|(t, _, _)| t.buf()).transpose()?;
    let grad = Grad {
        dx: &logits.buf()?,
        scale: 1.0 / n as f32,
        row_grad: None,
        plus: plus.as_ref(),
    };
    cross_entropy(&ctx.gpu, &logits, &targets, &rows, Some(grad))?;
    let ce = ctx.gpu.timed("loss mean", || rows.mean_all())?;
    let (total, kl) = match kl {
        None => (ce.clone(), None),
        Some((_, kl, weight)) => ((&ce + (&kl * weight)?)?, Some(kl)),
    };
    let tape = Tape {
        ctx,
        dims,
        ids,
        attn,
        rope,
        layers,
        x_last: x,
        xf,
        head,
        dlogits: logits,
    };
    let terms = Terms { total, ce, kl };
    Ok((terms, tape))
}
