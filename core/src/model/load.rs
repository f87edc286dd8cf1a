//! Loading a Hugging Face model folder: config, tokenizer, generation config and weights, checking every tensor's
//! shape against the config so a mismatch is reported with the file and tensor name instead of producing garbage.

use super::config::{token_ids, ModelConfig};
use super::llama::{Block, Linear, Model, LINEAR_KINDS};
use super::rope::Rope;
use super::tokenizer::Tokenizer;
use super::weights::WeightStore;
use crate::error::{Result, WhittleError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use whittle_kernels::Weight;

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
    Ok(Linear { weight, bias })
}

/// Builds the model from a config and an opened store.
pub fn build_model(config: ModelConfig, store: &WeightStore) -> Result<Model> {
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
            lins.push(load_linear(store, &p(kind), r, c, b)?);
        }
        blocks.push(Block {
            attn_norm: store.f32_vec(&p("input_layernorm.weight"), &[d])?,
            mlp_norm: store.f32_vec(&p("post_attention_layernorm.weight"), &[d])?,
            linears: lins.try_into().map_err(|_| WhittleError::Invalid("seven linears per block".into()))?,
        });
    }
    let norm = store.f32_vec("model.norm.weight", &[d])?;
    let lm_head = if cfg.tie_word_embeddings && !store.contains("lm_head.weight") {
        Linear { weight: Weight::Dense(embed.clone()), bias: None }
    } else {
        load_linear(store, "lm_head", v, d, false)?
    };
    let rope = Rope::new(cfg);
    Ok(Model { config, embed, blocks, norm, lm_head, rope })
}

/// Loads a model folder (config.json, tokenizer.json, safetensors, optional generation_config.json).
pub fn load_model(dir: &Path) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(WhittleError::file(dir, "not a folder (expected a Hugging Face model folder)"));
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
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
    let model = build_model(config, &store)?;
    Ok(LoadedModel { dir: dir.to_path_buf(), model, tokenizer, generation, store })
}
