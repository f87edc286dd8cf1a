//! Chat: turning a conversation into the prompt a model was trained on, and its tokens back into text as they
//! stream. The CLI's `whittle chat` and the GUI's Chat pane share this, so both prompt a model the same way.
//!
//! The prompt comes from the model folder's `tokenizer_config.json` `chat_template` (a Jinja template, rendered
//! with minijinja plus its Python-compatibility methods such as `.strip()`, which Hugging Face templates use), with
//! the variables transformers passes: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the
//! `raise_exception` function. A model without a template (the embedded stories260k, a story model) gets the plain
//! conversation as text: its turns concatenated, each reply continuing the text before it.

use crate::error::{Result, WhittleError};
use crate::model::{LoadedModel, Tokenizer};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    /// `user`, `assistant` or `system`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage { role: "user".into(), content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage { role: "assistant".into(), content: content.into() }
    }
}

/// How a model folder formats a conversation.
#[derive(Clone, Debug, Default)]
pub struct ChatTemplate {
    /// The Jinja source; `None`: the plain-text fallback.
    source: Option<String>,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for error messages.
    path: PathBuf,
}

/// A special token in tokenizer_config.json: a string, or an object with `content` (older transformers).
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads `dir/tokenizer_config.json`; a missing file or a config without `chat_template` gives the fallback.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(ChatTemplate { path, ..Default::default() });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| WhittleError::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| WhittleError::file(&path, format!("not valid JSON: {e}")))?;
        // A list of named templates (transformers ≥ 4.34) holds the chat one under "default".
        let source = match v.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| list.iter().find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n));
                let t = named("default").or_else(|| list.first());
                t.and_then(|t| t.get("template")).and_then(|t| t.as_str()).map(str::to_string)
            }
            Some(_) => return Err(WhittleError::file(&path, "chat_template: expected a string or a list of named templates")),
        };
        let template = ChatTemplate {
            source,
            bos_token: token_text(v.get("bos_token")),
            eos_token: token_text(v.get("eos_token")),
            path,
        };
        // Parse once here, so a broken template is reported when the model is opened, not at the first message.
        if let Some(src) = &template.source {
            template.env().template_from_str(src).map_err(|e| template.error(e))?;
        }
        Ok(template)
    }

    /// Whether the model has its own template (otherwise the plain-text fallback is used).
    pub fn has_template(&self) -> bool {
        self.source.is_some()
    }

    fn env(&self) -> Environment<'static> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env
    }

    fn error(&self, e: minijinja::Error) -> WhittleError {
        // The template's own `raise_exception` message is the useful part; minijinja adds the location.
        let detail = e.detail().map(str::to_string).unwrap_or_else(|| e.to_string());
        WhittleError::file(&self.path, format!("chat_template: {detail} (line {})", e.line().unwrap_or(0)))
    }

    /// The prompt text for `messages`, ending where the assistant's reply starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let Some(src) = &self.source else { return Ok(plain_text(messages)) };
        let env = self.env();
        let t = env.template_from_str(src).map_err(|e| self.error(e))?;
        t.render(minijinja::context! {
            messages => Value::from(messages.iter().map(|m| {
                Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())])
            }).collect::<Vec<Value>>()),
            add_generation_prompt => true,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| self.error(e))
    }

    /// The prompt's token ids for `model`: the rendered text, with the BOS id in front unless the template
    /// already put the BOS token there (templates usually do; the plain fallback never does).
    pub fn prompt_ids(&self, model: &LoadedModel, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.render(messages)?;
        let mut ids = model.tokenizer.encode(&text)?;
        if let Some(bos) = model.bos_id() {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(WhittleError::Invalid("the prompt is empty and the model has no BOS token".into()));
        }
        let max = model.model.config.max_position_embeddings;
        if ids.len() >= max {
            return Err(WhittleError::Invalid(format!(
                "the conversation is {} tokens, more than the model's context of {max} (max_position_embeddings); \
                 start a new conversation",
                ids.len()
            )));
        }
        Ok(ids)
    }
}

/// A story model's "conversation": the text so far. A reply continues its prompt directly; a new user turn starts
/// on a new line.
fn plain_text(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        if m.role == "user" && !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&m.content);
    }
    out
}

/// Turns generated ids into text as they arrive. Decoding token by token breaks characters that span tokens
/// (byte-fallback pieces), so the whole reply is decoded each time and only the new suffix is handed out.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    stop_ids: Vec<u32>,
    ids: Vec<u32>,
    text: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stop_ids: Vec<u32>) -> Self {
        TextStream { tokenizer, stop_ids, ids: Vec::new(), text: String::new() }
    }

    /// Adds a token; returns the text it completes (empty while a character is still partial, or for a stop id).
    pub fn push(&mut self, id: u32) -> String {
        if self.stop_ids.contains(&id) {
            return String::new();
        }
        self.ids.push(id);
        match self.tokenizer.decode(&self.ids) {
            Ok(t) if t.len() > self.text.len() && t.starts_with(&self.text) && !t.ends_with('\u{fffd}') => {
                let new = t[self.text.len()..].to_string();
                self.text = t;
                new
            }
            _ => String::new(),
        }
    }

    /// The reply so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_config(json: &str) -> (tempfile::TempDir, Result<ChatTemplate>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), json).unwrap();
        let t = ChatTemplate::from_dir(dir.path());
        (dir, t)
    }

    #[test]
    fn a_model_without_a_template_gets_the_plain_conversation() {
        let t = ChatTemplate::from_dir(&crate::model::source::default_model_dir().unwrap()).unwrap();
        assert!(!t.has_template());
        let msgs = [ChatMessage::user("Once upon a time"), ChatMessage::assistant(", there was a cat."), ChatMessage::user("The end")];
        assert_eq!(t.render(&msgs).unwrap(), "Once upon a time, there was a cat.\nThe end");
    }

    #[test]
    fn a_chatml_template_renders_with_the_generation_prompt() {
        let src = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let json = serde_json::json!({"chat_template": src, "eos_token": {"content": "<|im_end|>"}}).to_string();
        let (_d, t) = with_config(&json);
        let t = t.unwrap();
        assert!(t.has_template());
        let out = t.render(&[ChatMessage::user("  hi ")]).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(t.eos_token, "<|im_end|>");
    }

    #[test]
    fn raise_exception_becomes_a_readable_error_naming_the_file() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('Conversation must start with a system message') }}{% endif %}";
        let json = serde_json::json!({"chat_template": [{"name": "default", "template": src}], "bos_token": "<s>"}).to_string();
        let (_d, t) = with_config(&json);
        let err = t.unwrap().render(&[ChatMessage::user("x")]).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("must start with a system message"), "{err}");
    }

    #[test]
    fn a_broken_template_is_reported_when_read() {
        let (_d, t) = with_config(r#"{"chat_template": "{% for m in messages %}"}"#);
        let err = t.unwrap_err().to_string();
        assert!(err.contains("chat_template"), "{err}");
    }
}
