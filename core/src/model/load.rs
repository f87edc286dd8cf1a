//! Loading a Hugging Face model folder: config, tokenizer, generation config and weights, checking every tensor's
//! shape against the config so a mismatch is reported with the file and tensor name instead of producing garbage.
//!
//! Quantized checkpoints (GPTQ, compressed-tensors) load too: when config.json has a `quantization_config`, each
//! linear is read the way it says ([`crate::export::import`]) and runs on the packed kernels; the integer form is
//! kept on [`LoadedModel::quantized`] so the model can be re-exported unchanged or shown per layer.

use super::config::{token_ids, ModelConfig};
use super::llama::{Block, Linear, Model, LINEAR_KINDS};
use super::rope::Rope;
use super::tokenizer::Tokenizer;
use super::weights::WeightStore;
use crate::compress::types::QuantizedLinear;
use crate::error::{Result, WhittleError};
use crate::export::config::{ModuleScheme, QuantConfig};
use crate::export::import::{kernel_weight, quant_config_of, read_linear, ImportedLinear};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whittle_kernels::{DenseWeight, Weight};

/// `generation_config.json` fields that matter for generation.
#[derive(Clone, Debug, Default)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

#[derive(Clone)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub generation: GenerationConfig,
    pub store: Arc<WeightStore>,
    /// The integer form of linears read from a quantized checkpoint, by module name (empty for float checkpoints).
    pub quantized: BTreeMap<String, QuantizedLinear>,
}

impl LoadedModel {
    /// EOS ids from generation_config.json, else config.json.
    pub fn eos_ids(&self) -> Vec<u32> {
        if self.generation.eos_token_ids.is_empty() {
            self.model.config.eos_token_ids.clone()
        } else {
            self.generation.eos_token_ids.clone()
        }
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.generation.bos_token_id.or(self.model.config.bos_token_id)
    }

    /// Replaces every packed or 2:4 linear by its dense f32 weights and forgets the imported integer forms, so an
    /// imported quantized model can be compressed again (compressors start from float weights).
    pub fn dequantize_linears(&mut self) {
        let quantized = std::mem::take(&mut self.quantized);
        let m = &mut self.model;
        let names: Vec<String> = (0..m.blocks.len())
            .flat_map(|l| LINEAR_KINDS.iter().map(move |k| Model::module_name(l, k)))
            .chain(["lm_head".to_string()])
            .collect();
        let lins = m.blocks.iter_mut().flat_map(|b| b.linears.iter_mut()).chain([&mut m.lm_head]);
        for (name, lin) in names.iter().zip(lins) {
            let (rows, cols) = (lin.weight.rows(), lin.weight.cols());
            let data = match (&lin.weight, quantized.get(name)) {
                (Weight::Dense(_), _) => continue,
                (_, Some(q)) => q.dequantize().data,
                (Weight::Sparse24(s), None) => s.to_dense(),
                (Weight::Packed(_), None) => continue,
            };
            lin.weight = Weight::Dense(DenseWeight::from_f32(rows, cols, data));
        }
    }
}

fn read_generation_config(dir: &Path) -> Result<GenerationConfig> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(GenerationConfig::default());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| WhittleError::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| WhittleError::file(&path, format!("not valid JSON: {e}")))?;
    Ok(GenerationConfig {
        eos_token_ids: token_ids(v.get("eos_token_id")),
        bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
    })
}

/// Builds one linear from the store (dense `P.weight`, optional `P.bias`).
pub fn load_linear(store: &WeightStore, name: &str, rows: usize, cols: usize, bias: bool) -> Result<Linear> {
    let weight = Weight::Dense(store.dense(&format!("{name}.weight"), rows, cols)?);
    let bias_name = format!("{name}.bias");
    let bias = if bias || store.contains(&bias_name) { Some(store.f32_vec(&bias_name, &[rows])?) } else { None };
    Ok(Linear::new(weight, bias))
}

/// Builds one linear stored as `scheme` (a quantized checkpoint's layout, or dense), returning the imported integer
/// form when it has one.
pub fn load_linear_as(
    store: &WeightStore,
    scheme: ModuleScheme,
    name: &str,
    rows: usize,
    cols: usize,
    bias: bool,
) -> Result<(Linear, Option<QuantizedLinear>)> {
    let (weight, quant) = match read_linear(store, scheme, name, rows, cols)? {
        None => return load_linear(store, name, rows, cols, bias).map(|l| (l, None)),
        Some(ImportedLinear::Quantized(q)) => (kernel_weight(&q), Some(q)),
        Some(ImportedLinear::Dense(m)) => (Weight::Dense(DenseWeight::from_f32(rows, cols, m.data)), None),
    };
    let bias_name = format!("{name}.bias");
    let bias = if bias || store.contains(&bias_name) { Some(store.f32_vec(&bias_name, &[rows])?) } else { None };
    Ok((Linear::new(weight, bias), quant))
}

/// Builds the model from a config and an opened store of a float checkpoint.
pub fn build_model(config: ModelConfig, store: &WeightStore) -> Result<Model> {
    build_model_with(config, store, None).map(|(m, _)| m)
}

/// Builds the model; with `quant` (a parsed `quantization_config`) each linear is read as it says. Returns the
/// integer forms of the quantized linears by module name.
pub fn build_model_with(
    config: ModelConfig,
    store: &WeightStore,
    quant: Option<&QuantConfig>,
) -> Result<(Model, BTreeMap<String, QuantizedLinear>)> {
    let mut quantized = BTreeMap::new();
    let mut linear = |name: String, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
        let scheme = quant.map_or(ModuleScheme::Dense, |q| q.scheme_for(&name));
        let (lin, q) = load_linear_as(store, scheme, &name, rows, cols, bias)?;
        if let Some(q) = q {
            quantized.insert(name, q);
        }
        Ok(lin)
    };
    let cfg = &config;
    let (d, im, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let embed = store.dense("model.embed_tokens.weight", v, d)?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let shapes = [
            (cfg.q_dim(), d, cfg.qkv_bias),
            (cfg.kv_dim(), d, cfg.qkv_bias),
            (cfg.kv_dim(), d, cfg.qkv_bias),
            (d, cfg.q_dim(), cfg.o_bias),
            (im, d, cfg.mlp_bias),
            (im, d, cfg.mlp_bias),
            (d, im, cfg.mlp_bias),
        ];
        let mut lins = Vec::with_capacity(7);
        for (kind, (r, c, b)) in LINEAR_KINDS.iter().zip(shapes) {
            lins.push(linear(p(kind), r, c, b)?);
        }
        blocks.push(Block {
            attn_norm: store.f32_vec(&p("input_layernorm.weight"), &[d])?,
            mlp_norm: store.f32_vec(&p("post_attention_layernorm.weight"), &[d])?,
            linears: lins.try_into().map_err(|_| WhittleError::Invalid("seven linears per block".into()))?,
        });
    }
    let norm = store.f32_vec("model.norm.weight", &[d])?;
    let head_stored = store.names().any(|n| n.starts_with("lm_head."));
    let lm_head = if cfg.tie_word_embeddings && !head_stored {
        Linear::new(Weight::Dense(embed.clone()), None)
    } else {
        linear("lm_head".into(), v, d, false)?
    };
    let rope = Rope::new(cfg);
    Ok((Model { config, embed, blocks, norm, lm_head, rope }, quantized))
}

/// Loads a model folder (config.json, tokenizer.json, safetensors, optional generation_config.json).
pub fn load_model(dir: &Path) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(WhittleError::file(dir, "not a folder (expected a Hugging Face model folder)"));
    }
    let config_path = dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| WhittleError::io(&config_path, e))?;
    let quant = quant_config_of(&config_path, &config_text)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(WhittleError::field(
            dir.join("config.json"),
            "vocab_size",
            format!("{} is smaller than the tokenizer's {} tokens", config.vocab_size, tokenizer.vocab_size()),
        ));
    }
    let generation = read_generation_config(dir)?;
    let store = Arc::new(WeightStore::open_dir(dir)?);
    let (model, quantized) = build_model_with(config, &store, quant.as_ref())?;
    Ok(LoadedModel { dir: dir.to_path_buf(), model, tokenizer, generation, store, quantized })
}
