//! What a run keeps of its model (`train.save`): `ternary/`, a Hugging Face Qwen3 directory
//! (config.json, tokenizer.json, model.safetensors) whose ternary projections hold `W_t` (the
//! ternary values times their scales) and whose other tensors are the trained parameters, all
//! in the checkpoint's dtype, so that transformers (and anything else that reads a Qwen3
//! checkpoint, ternlab included: `model.source = "results/.../ternary"`) loads it as an
//! ordinary Qwen3. A run with no ternary projection saves its trained dense model this way,
//! which is how a study pretrains its own starting model.

use crate::choice::{serde_by_name, Choice};
use crate::model::{Params, Qwen3, Qwen3Config};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// `train.save`: what a run writes of its model when it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Save {
    /// Nothing (the seed's).
    #[default]
    None,
    /// `ternary/`, the Hugging Face directory of the trained model with the projections at
    /// `W_t`, and `ternary.safetensors`, the packed form.
    Ternary,
    /// `latent/`: what training continues from (see `crate::checkpoint`).
    Latent,
    /// Both of these.
    Both,
}

impl Save {
    pub fn ternary(self) -> bool {
        matches!(self, Save::Ternary | Save::Both)
    }

    pub fn latent(self) -> bool {
        matches!(self, Save::Latent | Save::Both)
    }
}

impl Choice for Save {
    const ALL: &'static [Self] = &[Save::None, Save::Ternary, Save::Latent, Save::Both];
    fn name(self) -> &'static str {
        match self {
            Save::None => "none",
            Save::Ternary => "ternary",
            Save::Latent => "latent",
            Save::Both => "both",
        }
    }
}

serde_by_name!(Save);

/// Where the saved model's config and companion files come from.
pub struct Companions<'a> {
    pub cfg: &'a Qwen3Config,
    /// The starting checkpoint's directory: its config.json, generation_config.json and
    /// tokenizer_config.json are copied (None for a preset: config.json is written from `cfg`).
    pub source_dir: Option<&'a Path>,
    pub tokenizer: &'a Tokenizer,
    /// The dtype the tensors are written in (the checkpoint's; bf16 for the presets).
    pub dtype: DType,
}

/// Writes the trained model as a Hugging Face Qwen3 directory at `dir` (replacing one that is
/// there), atomically: everything goes to `dir.tmp` first, which is then renamed.
pub fn save_hf_dir(dir: &Path, model: &Qwen3, params: &Params, c: &Companions) -> Result<()> {
    let tmp = sibling(dir, ".tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let tensors = hf_tensors(model, params, c.dtype)?;
    candle_core::safetensors::save(&tensors, tmp.join("model.safetensors"))
        .with_context(|| format!("writing {}", tmp.join("model.safetensors").display()))?;
    match c.source_dir.filter(|d| d.join("config.json").is_file()) {
        Some(src) => {
            for name in [
                "config.json",
                "generation_config.json",
                "tokenizer_config.json",
            ] {
                let from = src.join(name);
                if from.is_file() {
                    std::fs::copy(&from, tmp.join(name))
                        .with_context(|| format!("copying {}", from.display()))?;
                }
            }
        }
        None => std::fs::write(
            tmp.join("config.json"),
            serde_json::to_string_pretty(&hf_config(c.cfg, c.dtype))?,
        )?,
    }
    let tok = c
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    std::fs::write(tmp.join("tokenizer.json"), tok)?;
    replace_dir(&tmp, dir)
}

/// Puts the complete folder `tmp` at `dir`: an old `dir` is moved aside first and removed
/// after, so that at every moment one complete folder exists under `dir` or its `.old` name.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let old = sibling(dir, ".old");
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("renaming {}", dir.display()))?;
    }
    std::fs::rename(tmp, dir).with_context(|| format!("renaming to {}", dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// `dir` with `suffix` appended to its name.
pub fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut s = dir.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The checkpoint's tensors by name, on the CPU in `dtype`: each ternary projection's `W_t`
/// (at the model's current `lambda`), every other parameter as trained.
pub fn hf_tensors(model: &Qwen3, params: &Params, dtype: DType) -> Result<HashMap<String, Tensor>> {
    trained_weights(model, params)?
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_dtype(dtype)?.contiguous()?)))
        .collect()
}

/// The trained model as a dense checkpoint, on the CPU: each ternary projection's `W_t` as the
/// model computes it (at its current `lambda`), every other parameter as trained, its dtype
/// kept; learned scales are inside `W_t`.
pub fn trained_weights(model: &Qwen3, params: &Params) -> Result<HashMap<String, Tensor>> {
    let frozen = model.frozen()?;
    // (`frozen` keeps the layers' order and names; its ternary layers hold `W_t`)
    let ternary: HashMap<String, Tensor> = frozen
        .linears()
        .into_iter()
        .zip(model.linears())
        .filter(|(_, live)| live.is_ternary())
        .map(|(f, _)| (f.name().to_string(), f.weight().clone()))
        .collect();
    let learned = learned_scales(model);
    let mut out = HashMap::new();
    for (name, var) in &params.named {
        if learned.contains(&var.as_tensor().id()) {
            // (a learned scale is in W_t already; no checkpoint of this layout has it)
            continue;
        }
        let t = ternary.get(name).unwrap_or(var.as_tensor());
        out.insert(name.clone(), t.to_device(&Device::Cpu)?.contiguous()?);
    }
    Ok(out)
}

/// The learned-scale parameters of `model` (`quant.scale = "learned"`), which an export stores
/// inside W_t or as the packed scales rather than as tensors of their own.
fn learned_scales(model: &Qwen3) -> Vec<candle_core::TensorId> {
    model
        .linears()
        .iter()
        .filter_map(|l| l.learned_scale().map(|s| s.id()))
        .collect()
}

/// A transformers Qwen3 config.json for `cfg`: the keys of 4.x (`rope_theta`, `torch_dtype`)
/// and of 5.x (`rope_parameters`, `dtype`).
pub fn hf_config(cfg: &Qwen3Config, dtype: DType) -> serde_json::Value {
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": dtype,
        "dtype": dtype,
    })
}

/// The packed file's format name (its metadata key `format`).
pub const PACKED_FORMAT: &str = "ternlab-ternary-v1";

/// How the packed file stores a ternary weight's levels (its metadata key `codes`).
pub const PACKED_CODES: &str = "2 bits per weight, 4 weights per byte, the first weight in the \
    lowest two bits; code = level + 1 (0: -1, 1: 0, 2: +1); weights in row-major (out, in) order";

/// One ternary projection of a packed file (its metadata `layers` entry).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PackedLayer {
    /// (out, in)
    pub shape: [usize; 2],
    /// Consecutive row-major weights per scale.
    pub group: usize,
    /// The scales' dtype: "f32", "bf16" or "f16".
    pub scale_dtype: String,
    /// 8: the layer's input is fake-quantized to 8 bits per token (absmax) before the
    /// product, as it trained (`quant.activation_bits`); 0: not.
    #[serde(default)]
    pub activation_bits: u32,
}

/// `ternary.safetensors`: each ternary projection as `<prefix>.weight_codes` (U8, 2-bit codes,
/// `PACKED_CODES`) and `<prefix>.weight_scale` (its group scales as used, in the scale dtype,
/// shape `ternary::scale_shape`); every other parameter as it trained (its dtype kept); metadata
/// `format`, `codes` and `layers` (JSON: name -> `PackedLayer`, which says whether the layer
/// quantizes its input). The levels are those of W_t
/// (a run that ended inside its quantization warm-up saves the fully ternary weights here).
pub fn save_packed(path: &Path, model: &Qwen3, params: &Params) -> Result<()> {
    use crate::model::ternary::levels_with;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut layers = std::collections::BTreeMap::new();
    let learned = learned_scales(model);
    for lin in model.ternary_linears() {
        let q = lin.quant().expect("a ternary layer");
        let (out, inp) = lin.weight().dims2()?;
        let s = lin.group_scales()?;
        let levels = levels_with(lin.weight(), q, &s)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let mut codes = vec![0u8; levels.len().div_ceil(4)];
        for (i, l) in levels.iter().enumerate() {
            codes[i / 4] |= ((*l as i32 + 1) as u8) << (2 * (i % 4));
        }
        let prefix = lin.name().trim_end_matches(".weight");
        let n = codes.len();
        tensors.push((
            format!("{prefix}.weight_codes"),
            Tensor::from_vec(codes, n, &Device::Cpu)?,
        ));
        let scale = s
            .reshape(crate::model::ternary::scale_shape(q, (out, inp)))?
            .to_device(&Device::Cpu)?
            .to_dtype(q.scale_dtype.dtype())?;
        tensors.push((format!("{prefix}.weight_scale"), scale));
        layers.insert(
            lin.name().to_string(),
            PackedLayer {
                shape: [out, inp],
                group: q.group,
                scale_dtype: q.scale_dtype.name().to_string(),
                activation_bits: if lin.quantizes_activations() { 8 } else { 0 },
            },
        );
    }
    for (name, var) in &params.named {
        if layers.contains_key(name) || learned.contains(&var.as_tensor().id()) {
            continue;
        }
        tensors.push((name.clone(), var.as_tensor().to_device(&Device::Cpu)?));
    }
    let metadata: HashMap<String, String> = [
        ("format".to_string(), PACKED_FORMAT.to_string()),
        ("codes".to_string(), PACKED_CODES.to_string()),
        ("layers".to_string(), serde_json::to_string(&layers)?),
    ]
    .into();
    let tmp = sibling(path, ".tmp");
    safetensors::tensor::serialize_to_file(tensors, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Reads a packed file back into checkpoint tensors: each ternary projection's W_t (f32, the
/// levels times their scales, exactly the trained W_t), every other tensor as stored.
pub fn unpack(path: &Path) -> Result<crate::model::Weights> {
    Ok(read_packed(path)?.0)
}

/// `unpack`, with the file's ternary projections by name (its metadata `layers`).
pub fn read_packed(
    path: &Path,
) -> Result<(
    crate::model::Weights,
    std::collections::BTreeMap<String, PackedLayer>,
)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let layers = layers_of(path, &bytes)?;
    let mut all = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    for (name, layer) in &layers {
        let prefix = name.trim_end_matches(".weight");
        let take = |all: &mut HashMap<String, Tensor>, key: String| {
            all.remove(&key)
                .with_context(|| format!("{}: no tensor {key}", path.display()))
        };
        let codes = take(&mut all, format!("{prefix}.weight_codes"))?.to_vec1::<u8>()?;
        let scale = take(&mut all, format!("{prefix}.weight_scale"))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let [out, inp] = layer.shape;
        let n = out * inp;
        anyhow::ensure!(
            codes.len() == n.div_ceil(4) && scale.len() * layer.group == n,
            "{}: {name}: {} code bytes and {} scales do not fit {out} x {inp} in groups of {}",
            path.display(),
            codes.len(),
            scale.len(),
            layer.group
        );
        let w: Vec<f32> = (0..n)
            .map(|i| {
                let level = ((codes[i / 4] >> (2 * (i % 4))) & 3) as f32 - 1.0;
                level * scale[i / layer.group]
            })
            .collect();
        all.insert(name.clone(), Tensor::from_vec(w, (out, inp), &Device::Cpu)?);
    }
    Ok((all, layers))
}

fn layers_of(path: &Path, bytes: &[u8]) -> Result<std::collections::BTreeMap<String, PackedLayer>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file: {e}", path.display()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    anyhow::ensure!(
        info.get("format").map(String::as_str) == Some(PACKED_FORMAT),
        "{}: not a ternlab packed file (metadata format = {:?}, expected {PACKED_FORMAT:?})",
        path.display(),
        info.get("format")
    );
    Ok(serde_json::from_str(
        info.get("layers").map_or("{}", String::as_str),
    )?)
}

/// What a run saved, checked: the packed file, unpacked into a model with dense projections
/// (activations quantized where the trained model's are), gives the trained model's logits
/// on `ids`; returns the largest absolute difference (0 on the CPU in f32).
pub fn check_packed(path: &Path, model: &Qwen3, ids: &Tensor) -> Result<f64> {
    use crate::model::{GroupSize, TernarySpec};
    let weights = unpack(path)?;
    let dense = TernarySpec::new(Vec::new(), GroupSize::Row);
    let (mut copy, _) = Qwen3::new(&model.cfg, weights, &dense, model.device())?;
    copy = copy
        .with_compute_dtype(model.compute_dtype)
        .with_ops(model.ops());
    for (mine, theirs) in copy.linears_mut().into_iter().zip(model.linears()) {
        mine.act_quant = theirs.quantizes_activations();
    }
    let want = model.frozen()?.forward(ids)?.to_dtype(DType::F32)?;
    let got = copy.forward(ids)?.to_dtype(DType::F32)?;
    let err = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(err as f64)
}
