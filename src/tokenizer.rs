//! `tokenizer.json` through the `tokenizers` crate, `tokenizer_config.json` for BOS/EOS,
//! `add_bos_token` and the chat template (rendered with minijinja), and [`TextStream`], an
//! incremental detokeniser that never emits half a UTF-8 character.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};

/// One chat message, as chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message from `role` ("system", "user", "assistant").
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A special token given as a string or as `{"content": ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Text(s) => s,
            SpecialToken::Added { content } => content,
        }
    }
}

/// A named template in the list form of `chat_template`.
#[derive(Debug, Clone, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ChatTemplate {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    add_bos_token: Option<bool>,
    chat_template: Option<ChatTemplate>,
}

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// The same tokenizer reading special-token strings as text (user content).
    text_only: Arc<tokenizers::Tokenizer>,
    bos: Option<(String, u32)>,
    eos_text: Option<String>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    /// Set once the chat template has passed its memory bound: its thread holds that memory for
    /// good, so the template is not run again.
    template_refused: AtomicBool,
}

impl Tokenizer {
    /// Loads `tokenizer.json` (and `tokenizer_config.json` if present) from `dir`.
    /// `config` adds its `bos_token_id`/`eos_token_id` where the tokenizer config names none.
    pub fn load(dir: &Path, config: Option<&Config>) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Tokenizer::from_parts(&bytes, &path, &dir.join("tokenizer_config.json"), config)
    }

    /// Builds a tokenizer from `tokenizer.json` bytes; `json_path` names them in errors, and
    /// `config_path` is read if it exists.
    pub fn from_parts(json: &[u8], json_path: &Path, config_path: &Path, config: Option<&Config>) -> Result<Tokenizer> {
        let inner = from_bytes(json).map_err(|e| Error::Tokenizer {
            path: json_path.to_path_buf(),
            reason: format!("not a valid tokenizer.json: {e}"),
        })?;
        let tcfg = read_tokenizer_config(config_path)?;
        let id_of = |tok: &SpecialToken, field: &str| -> Result<(String, u32)> {
            let text = tok.content().to_string();
            match inner.token_to_id(&text) {
                Some(id) => Ok((text, id)),
                None => {
                    Err(Error::config(config_path, field, format!("token `{text}` is not in {}", json_path.display())))
                }
            }
        };
        let bos = match &tcfg.bos_token {
            Some(t) => Some(id_of(t, "bos_token")?),
            None => config.and_then(|c| c.bos_token_id).and_then(|id| inner.id_to_token(id).map(|t| (t, id))),
        };
        let mut eos_ids = config.map(|c| c.eos_token_id.clone()).unwrap_or_default();
        let mut eos_text = None;
        if let Some(t) = &tcfg.eos_token {
            let (text, id) = id_of(t, "eos_token")?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
            eos_text = Some(text);
        }
        if eos_text.is_none() {
            eos_text = eos_ids.first().and_then(|&id| inner.id_to_token(id));
        }
        let chat_template = match tcfg.chat_template {
            None => None,
            Some(ChatTemplate::One(t)) => Some(t),
            Some(ChatTemplate::Named(list)) => list.into_iter().find(|t| t.name == "default").map(|t| t.template),
        };
        let add_bos = tcfg.add_bos_token.unwrap_or(false);
        Ok(Tokenizer::assemble(inner, bos, eos_text, eos_ids, add_bos, chat_template))
    }

    /// Builds a tokenizer from `tokenizer.json` bytes and settings given directly (a GGUF file's
    /// metadata); `source` names them in errors.
    pub fn from_settings(
        json: &[u8],
        source: &Path,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Result<Tokenizer> {
        let inner = from_bytes(json).map_err(|e| Error::Tokenizer {
            path: source.to_path_buf(),
            reason: format!("cannot build the tokenizer from the metadata: {e}"),
        })?;
        let bos = bos_id.and_then(|id| inner.id_to_token(id).map(|t| (t, id)));
        let eos_text = eos_ids.first().and_then(|&id| inner.id_to_token(id));
        Ok(Tokenizer::assemble(inner, bos, eos_text, eos_ids, add_bos, chat_template))
    }

    /// The tokenizer from its parts, with the text-only twin that user content is encoded by.
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<(String, u32)>,
        eos_text: Option<String>,
        eos_ids: Vec<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let mut text_only = inner.clone();
        text_only.set_encode_special_tokens(true);
        Tokenizer {
            inner: Arc::new(inner),
            text_only: Arc::new(text_only),
            bos,
            eos_text,
            eos_ids,
            add_bos,
            chat_template,
            template_refused: false.into(),
        }
    }

    /// Token ids of `text` as a model input: BOS first when `add_bos_token` says so.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.after_bos(self.encode_plain(text)?))
    }

    /// [`Tokenizer::encode`] with every special token's string in `text` encoded as text: the
    /// ids of a prompt a user typed, where only the BOS (if the tokenizer adds one) is a control
    /// token.
    pub fn encode_as_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.after_bos(self.encode_text(text)?))
    }

    /// `ids` after the BOS, if the tokenizer adds one.
    fn after_bos(&self, ids: Vec<u32>) -> Vec<u32> {
        match (self.add_bos, &self.bos) {
            (true, Some((_, bos))) => std::iter::once(*bos).chain(ids).collect(),
            _ => ids,
        }
    }

    /// Token ids of `text` alone: no BOS, no post-processing (special tokens in the text still match).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        ids_of(&self.inner, text)
    }

    /// Token ids of a long text, encoded in parallel pieces cut at line ends (a corpus).
    pub fn encode_chunks(&self, text: &str) -> Result<Vec<u32>> {
        const PIECE: usize = 1 << 16;
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + PIECE).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            if let Some(nl) = text[end..].find('\n') {
                end += nl + 1;
            } else {
                end = text.len();
            }
            pieces.push(&text[start..end]);
            start = end;
        }
        let pieces: Vec<String> = pieces.into_iter().map(str::to_owned).collect();
        let inner = self.inner.clone();
        let encodings = bounded_encode(text.len(), move || inner.encode_batch(pieces, false))?;
        Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
    }

    /// Token ids of `text` (no BOS) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let (inner, owned) = (self.inner.clone(), text.to_owned());
        let enc = bounded_encode(text.len(), move || inner.encode(owned, false))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The BOS id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|(_, id)| *id)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::InvalidArgument(format!("cannot decode token ids: {e}")))
    }

    /// Whether `encode` puts BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Every id that ends generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the tokenizer config has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Token ids of `text` read as text only: a special token's string in it is spelled out
    /// in ordinary tokens, never encoded as the control token (a user's words).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        ids_of(&self.text_only, text)
    }

    /// The model input of a conversation: the chat template rendered over `messages` (with the
    /// assistant's turn opened if asked), where control tokens come only from the template's
    /// own text and every message's content is encoded as text ([`Tokenizer::encode_text`]):
    /// a user who types `<｜end▁of▁sentence｜>` or a role marker cannot end or forge a turn.
    pub fn encode_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        // Render once with a marker in place of each content, to learn what is scaffolding.
        let marker = |i: usize| format!("\u{E000}latent-content-{i}\u{E001}");
        let marked: Vec<Message> =
            messages.iter().enumerate().map(|(i, m)| Message { role: m.role.clone(), content: marker(i) }).collect();
        let rendered = self.apply_chat_template(&marked, add_generation_prompt)?;
        // The rendering as (text, is content) pieces.
        let mut pieces: Vec<(&str, bool)> = Vec::new();
        let mut rest = rendered.as_str();
        while let Some((at, i)) = (0..messages.len()).filter_map(|i| rest.find(&marker(i)).map(|at| (at, i))).min() {
            pieces.push((&rest[..at], false));
            pieces.push((&messages[i].content, true));
            rest = &rest[at + marker(i).len()..];
        }
        if rest.contains('\u{E000}') {
            return Err(Error::Template(
                "the chat template changed a message's content in a way latent cannot follow".into(),
            ));
        }
        pieces.push((rest, false));
        // Control tokens where the scaffolding has them; every run of text between them, the
        // contents included, encoded as text in one piece (as a joint encoding would).
        let specials: std::collections::HashSet<u32> =
            self.inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        let (mut ids, mut run) = (Vec::new(), String::new());
        for (text, is_content) in pieces {
            if is_content {
                run.push_str(text);
                continue;
            }
            let (found, offsets) = self.encode_with_offsets(text)?;
            let mut last = 0;
            for (id, (start, end)) in found.into_iter().zip(offsets) {
                if specials.contains(&id) && start >= last && end <= text.len() {
                    run.push_str(&text[last..start]);
                    ids.extend(self.encode_text(&run)?);
                    run.clear();
                    ids.push(id);
                    last = end;
                }
            }
            run.push_str(&text[last..]);
        }
        ids.extend(self.encode_text(&run)?);
        Ok(ids)
    }

    /// The text of one token as it appears in decoded output (special tokens included).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Renders the chat template over `messages`, ending with the assistant's turn if asked.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("tokenizer_config.json has no `chat_template`".into()))?;
        if self.template_refused.load(Ordering::Relaxed) {
            return Err(Error::Template(format!(
                "the chat template used more than {} MiB of memory before; it is not run again",
                TEMPLATE_MEMORY >> 20
            )));
        }
        let template = template.to_string();
        let messages = messages.to_vec();
        let bos = self.bos.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        let eos = self.eos_text.clone().unwrap_or_default();
        let limits = crate::bounded::Limits { memory: Some(TEMPLATE_MEMORY), time: TEMPLATE_TIME };
        match crate::bounded::run(limits, move || render(&template, &messages, add_generation_prompt, &bos, &eos)) {
            Ok(rendered) => rendered,
            Err(crate::bounded::Exceeded::Memory(_)) => {
                self.template_refused.store(true, Ordering::Relaxed);
                Err(Error::Template(format!(
                    "the chat template used more than {} MiB of memory; a template renders messages, not this much",
                    TEMPLATE_MEMORY >> 20
                )))
            }
            Err(crate::bounded::Exceeded::Time(t)) => Err(Error::Template(format!(
                "the chat template took more than {} s; a template renders messages in milliseconds",
                t.as_secs_f64()
            ))),
            Err(e) => Err(Error::Template(format!("the chat template failed: {e:?}"))),
        }
    }
}

/// Renders `template` over `messages` with the fuel and output bounds (the memory and time bounds
/// are the caller's).
fn render(template: &str, messages: &[Message], add_generation_prompt: bool, bos: &str, eos: &str) -> Result<String> {
    let mut env = Environment::new();
    // A template is code a model folder brings: its work and its output are bounded, so that
    // loops of loops end in an error within a second, not in minutes or an abort.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| Error::Template(e.to_string()))?;
    let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
    let ctx = context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => bos, eos_token => eos };
    let mut out = Capped { text: Vec::new(), cap: TEMPLATE_OUTPUT };
    let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
    match rendered {
        Ok(_) => String::from_utf8(out.text).map_err(|e| Error::Template(e.to_string())),
        Err(_) if out.text.len() >= out.cap => Err(Error::Template(format!(
            "the chat template's output passed {} MiB; a template renders messages, not this much text",
            TEMPLATE_OUTPUT >> 20
        ))),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::Template(format!(
            "the chat template ran past its budget of {TEMPLATE_FUEL} operations (a loop too long for rendering messages)"
        ))),
        Err(e) => Err(Error::Template(e.to_string())),
    }
}

/// Operations a chat template may run per rendering (DeepSeek's takes a few dozen per message).
pub const TEMPLATE_FUEL: u64 = 5_000_000;
/// Bytes a chat template's rendering may hold at once (its output included).
pub const TEMPLATE_MEMORY: usize = 256 << 20;
/// How long a chat template may take per rendering.
pub const TEMPLATE_TIME: Duration = Duration::from_secs(1);
/// Bytes a chat template may write per rendering.
pub const TEMPLATE_OUTPUT: usize = 64 << 20;

/// A writer that refuses to hold more than `cap` bytes.
struct Capped {
    text: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.cap {
            self.text.extend_from_slice(&buf[..self.cap - self.text.len()]);
            return Err(std::io::Error::other("the template's output is over its cap"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Builds a `tokenizers` tokenizer; a panic inside its deserializer (it has some on malformed
/// input) is an error like any other.
fn from_bytes(json: &[u8]) -> std::result::Result<tokenizers::Tokenizer, String> {
    match crate::bounded::catch_panic(|| tokenizers::Tokenizer::from_bytes(json)) {
        Ok(built) => built.map_err(|e| e.to_string()),
        Err(panic) => Err(format!("the tokenizers library failed on it: {panic}")),
    }
}

/// `text`'s ids by `tokenizer`, without post-processing.
fn ids_of(tokenizer: &Arc<tokenizers::Tokenizer>, text: &str) -> Result<Vec<u32>> {
    let (tokenizer, owned) = (tokenizer.clone(), text.to_owned());
    let enc = bounded_encode(text.len(), move || tokenizer.encode(owned, false))?;
    Ok(enc.get_ids().to_vec())
}

/// How long encoding `bytes` of text may take: generous for any sane tokenizer (they encode
/// megabytes a second), and short of the minutes a catastrophically backtracking regex takes.
pub fn encode_time_limit(bytes: usize) -> Duration {
    Duration::from_secs(5) + Duration::from_secs_f64(bytes as f64 * 2e-6)
}

/// Runs a `tokenizers` encoding of `bytes` of text under [`encode_time_limit`].
///
/// A tokenizer.json is code a model folder brings: a pre-tokenizer whose regex backtracks past
/// the regex engine's retry limit panics inside the engine, and one just short of it takes
/// minutes. Both are errors of this text and this tokenizer, not of the program.
fn bounded_encode<T: Send + 'static>(
    bytes: usize,
    encode: impl FnOnce() -> tokenizers::Result<T> + Send + 'static,
) -> Result<T> {
    let limits = crate::bounded::Limits { memory: None, time: encode_time_limit(bytes) };
    match crate::bounded::run(limits, encode) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Error::InvalidArgument(format!("cannot tokenize the text: {e}"))),
        Err(crate::bounded::Exceeded::Time(t)) => Err(Error::InvalidArgument(format!(
            "tokenizing this text ({bytes} bytes) took more than {:.0} s: the tokenizer's pre-tokenizer regex backtracks \
             too much on it",
            t.as_secs_f64()
        ))),
        Err(crate::bounded::Exceeded::Panicked(why)) => Err(Error::InvalidArgument(format!(
            "the tokenizer failed on this text ({bytes} bytes): {why} (its pre-tokenizer's regex backtracks too much)"
        ))),
        Err(e) => Err(Error::Internal(format!("tokenizing: {e:?}"))),
    }
}

fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig> {
    if !path.exists() {
        return Ok(TokenizerConfig::default());
    }
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| Error::config(path, &e.path().to_string(), e.inner().to_string()))
}

/// Turns a stream of token ids into text pieces, holding back bytes of a character that is not
/// complete yet (a byte-level token can end inside a multi-byte UTF-8 character).
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> TextStream {
        TextStream::default()
    }

    /// Adds `id`; returns the new text once it forms whole characters.
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.ends_with('\u{FFFD}') || full.len() <= prefix.len() || !full.is_char_boundary(prefix.len()) {
            return Ok(None);
        }
        let piece = full[prefix.len()..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(piece))
    }

    /// Whatever is still held back at the end of the stream (broken bytes decode as U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).filter(|s| !s.is_empty()).map(str::to_string))
    }
}

/// A token's byte range `(start, end)` in the encoded text.
pub type Span = (usize, usize);

/// The special tokens a tokenizer trained by latent carries (DeepSeek's spellings).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";

/// The chat template written with a trained tokenizer (DeepSeek-V3's turn markers).
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/// Trains a byte-level BPE tokenizer of `vocab_size` ids (special tokens included) on `files`
/// and writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS, chat template) into `out`.
pub fn train_bpe(files: &[std::path::PathBuf], vocab_size: usize, out: &Path) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};

    for f in files {
        if !f.is_file() {
            return Err(Error::io(f, std::io::Error::new(std::io::ErrorKind::NotFound, "corpus file not found")));
        }
    }
    let specials: Vec<AddedToken> = [BOS, EOS, USER, ASSISTANT].iter().map(|t| AddedToken::from(*t, true)).collect();
    if vocab_size < 256 + specials.len() + 1 {
        return Err(Error::InvalidArgument(format!(
            "vocab size {vocab_size} is too small: a byte-level BPE needs at least {} ids",
            256 + specials.len() + 1
        )));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tk = tokenizers::TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::default().add_prefix_space(false))))
    .with_post_processor(Some(PostProcessorWrapper::ByteLevel(ByteLevel::default().trim_offsets(false))))
    .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())))
    .build()
    .map_err(|e| Error::InvalidArgument(format!("cannot build the tokenizer: {e}")))?;
    let names: Vec<String> = files.iter().map(|f| f.to_string_lossy().into_owned()).collect();
    tk.train_from_files(&mut trainer, names)
        .map_err(|e| Error::InvalidArgument(format!("tokenizer training failed: {e}")))?;
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let json_path = out.join("tokenizer.json");
    let json = tk.to_string(false).map_err(|e| Error::InvalidArgument(format!("cannot write tokenizer.json: {e}")))?;
    crate::train::write_atomic(&json_path, json.as_bytes())?;
    let config = serde_json::json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    });
    let config_path = out.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    crate::train::write_atomic(&config_path, text.as_bytes())?;
    Tokenizer::load(out, None)
}
