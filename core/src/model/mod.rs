//! Models: `config.json` (config), safetensors storage (weights), the tokenizer, the Llama-family forward pass
//! (llama) with its cache (kv_cache) and RoPE, loading a folder (load), model sources (source: folder, Hub id,
//! embedded default) and generation.

pub mod config;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod load;
pub mod rope;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use kv_cache::{KvCache, Scratch};
pub use llama::{Block, Linear, Model, Resume, Site, LINEAR_KINDS};
pub use load::{load_model, LoadedModel};
pub use tokenizer::Tokenizer;
