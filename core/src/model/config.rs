//! `config.json` of a Hugging Face causal LM, reduced to what the Llama-family forward pass needs, validated once
//! here so the forward pass can trust it. Llama, Mistral and Qwen2 share one architecture up to q/k/v biases.

use crate::error::{Result, WhittleError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE frequency scaling variants seen in Llama-family configs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias: true` on Llama).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` as written, for the model card.
    pub torch_dtype: Option<String>,
    /// The raw JSON, kept so exports can write it back with only `quantization_config` changed.
    #[serde(skip)]
    pub raw: Value,
}

/// Above any model anyone runs (2^48 ≈ 281 trillion parameters); guards the size arithmetic.
const MAX_PARAMETERS: usize = 1 << 48;

fn usize_field(v: &Value, path: &Path, name: &str) -> Result<Option<usize>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| WhittleError::field(path, name, format!("expected a non-negative integer, found {x}"))),
    }
}

fn required(v: &Value, path: &Path, name: &str) -> Result<usize> {
    usize_field(v, path, name)?.ok_or_else(|| WhittleError::field(path, name, "missing"))
}

fn f64_field(v: &Value, path: &Path, name: &str, default: f64) -> Result<f64> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_f64().ok_or_else(|| WhittleError::field(path, name, format!("expected a number, found {x}"))),
    }
}

/// Token ids given as an integer or a list of integers.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| WhittleError::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| WhittleError::file(path, format!("not valid JSON: {e}")))?;
        Self::from_json(v, path)
    }

    pub fn from_json(v: Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(WhittleError::file(path, "expected a JSON object"));
        }
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string)
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()).map(str::to_string))
            .ok_or_else(|| WhittleError::field(path, "architectures", "missing (and no `model_type`)"))?;
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => {
                return Err(WhittleError::field(
                    path,
                    "architectures",
                    format!("unsupported architecture `{other}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"),
                ))
            }
        };
        let hidden_size = required(&v, path, "hidden_size")?;
        let num_heads = required(&v, path, "num_attention_heads")?;
        if num_heads == 0 || hidden_size == 0 {
            return Err(WhittleError::field(path, "num_attention_heads", "hidden_size and num_attention_heads must be > 0"));
        }
        let num_kv_heads = usize_field(&v, path, "num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(WhittleError::field(
                path,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = usize_field(&v, path, "head_dim")?.unwrap_or(hidden_size / num_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(WhittleError::field(path, "head_dim", format!("{head_dim} must be even and > 0 for RoPE")));
        }
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => RopeScaling::None,
            Some(rs) => {
                let kind = rs.get("rope_type").or_else(|| rs.get("type")).and_then(|t| t.as_str()).unwrap_or("");
                let num = |k: &str| {
                    rs.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
                        WhittleError::field(path, format!("rope_scaling.{k}"), "missing or not a number")
                    })
                };
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: num("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    other => {
                        return Err(WhittleError::field(
                            path,
                            "rope_scaling.rope_type",
                            format!("unsupported rope scaling `{other}` (supported: default, linear, llama3)"),
                        ))
                    }
                }
            }
        };
        let act = v.get("hidden_act").and_then(|a| a.as_str()).unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(WhittleError::field(path, "hidden_act", format!("unsupported activation `{act}` (only silu)")));
        }
        let attention_bias = v.get("attention_bias").and_then(|b| b.as_bool()).unwrap_or(false);
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: required(&v, path, "intermediate_size")?,
            num_layers: required(&v, path, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: required(&v, path, "vocab_size")?,
            max_position_embeddings: usize_field(&v, path, "max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f64_field(&v, path, "rms_norm_eps", 1e-6)?,
            rope_theta: f64_field(&v, path, "rope_theta", 10000.0)?,
            rope_scaling,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|b| b.as_bool()).unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture != Architecture::Qwen2 && attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(|b| b.as_bool()).unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            torch_dtype: v.get("torch_dtype").and_then(|d| d.as_str()).map(str::to_string),
            raw: v,
        };
        if cfg.intermediate_size == 0 || cfg.num_layers == 0 || cfg.vocab_size == 0 {
            return Err(WhittleError::field(path, "intermediate_size", "intermediate_size, num_hidden_layers and vocab_size must be > 0"));
        }
        // Sizes are multiplied together everywhere; a config whose products overflow describes no real model.
        if cfg.checked_parameter_count().is_none_or(|n| n > MAX_PARAMETERS) {
            return Err(WhittleError::field(
                path,
                "hidden_size",
                "the sizes (hidden_size, intermediate_size, num_hidden_layers, vocab_size, heads) give an implausible parameter count (over 2^48)",
            ));
        }
        Ok(cfg)
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters of the whole model (embedding, blocks, norms, head unless tied). Checked not to overflow when
    /// the config was parsed.
    pub fn parameter_count(&self) -> usize {
        self.checked_parameter_count().expect("parameter count checked in from_json")
    }

    fn checked_parameter_count(&self) -> Option<usize> {
        let (d, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads.checked_mul(self.head_dim)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim)?;
        let attn = d.checked_mul(q.checked_add(kv)?)?.checked_mul(2)?;
        let mlp = d.checked_mul(i)?.checked_mul(3)?;
        let per_layer = attn.checked_add(mlp)?.checked_add(d.checked_mul(2)?)?;
        let embed = v.checked_mul(d)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        embed.checked_add(self.num_layers.checked_mul(per_layer)?)?.checked_add(d)
    }
}
