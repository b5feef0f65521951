//! Constrained decoding: output that always parses. A [`ConstraintSpec`] (a JSON Schema, "any
//! JSON object", a regular expression or a Lark grammar) is compiled by `llguidance` against the
//! model's own vocabulary into a [`Constraint`], which a [`crate::Sampler`] consults every
//! step: tokens the grammar cannot continue with are masked before sampling, EOS is allowed
//! only where the grammar may end, and generation stops when the grammar is complete.
//!
//! Cost: greedy decoding first checks the token the model prefers (one parser step) and
//! computes the full mask only when the grammar rejects it, so a model that already follows
//! the grammar pays little and keeps its exact tokens. Where the grammar fixes the text that
//! follows (a required key, a closing `"}`), its first token as the model's tokenizer spells
//! it is taken without a mask (llguidance's fast-forward tokens). Otherwise sampling masks
//! first, so that temperature, top-k, top-p and min-p act on the allowed tokens only.

use crate::error::{Error, Result};
use crate::model::Model;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What the output must match.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstraintSpec {
    /// A JSON Schema (the text of the schema).
    JsonSchema(String),
    /// Any JSON object.
    AnyJson,
    /// A regular expression the whole output must match.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

impl ConstraintSpec {
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            ConstraintSpec::JsonSchema(text) => {
                let v: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| Error::Constraint(format!("the JSON schema is not JSON: {e}")))?;
                TopLevelGrammar::from_json_schema(bounded_whitespace(v))
            }
            ConstraintSpec::AnyJson => {
                TopLevelGrammar::from_json_schema(bounded_whitespace(serde_json::json!({"type": "object"})))
            }
            ConstraintSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }

    /// An [`Error::Constraint`] naming what kind of constraint failed.
    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Constraint(format!("{}: {e}", self.kind()))
    }

    /// What the spec is, for messages (`JSON schema`, `regex`…).
    pub fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonSchema(_) => "JSON schema",
            ConstraintSpec::AnyJson => "JSON object",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Lark(_) => "Lark grammar",
        }
    }
}

/// JSON between its tokens may hold one space, or a newline and up to 20 spaces or tabs (as
/// llama.cpp's schema grammars allow): unbounded whitespace would let a model that does not
/// know the answer fill the context with it. A schema's own `x-guidance` options win.
fn bounded_whitespace(mut schema: serde_json::Value) -> serde_json::Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance")
            .or_insert_with(|| serde_json::json!({"whitespace_pattern": "(\\x20|\\x0A[\\x20\\x09]{0,20})"}));
    }
    schema
}

/// A model's vocabulary as the grammar compiler sees it (token bytes in a trie), built once per
/// model on first use and shared by every constraint on it.
pub(crate) struct Vocabulary {
    factory: Result<Arc<ParserFactory>, String>,
}

impl Vocabulary {
    fn build(model: &Model) -> Result<Arc<ParserFactory>, String> {
        let path = model.dir.join("tokenizer.json");
        let json = model.tokenizer_json().map_err(|e| e.to_string())?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| format!("{}: cannot read the token bytes: {e}", path.display()))?;
        let vocab = model.config.vocab_size.max(words.len());
        words.resize(vocab, Vec::new()); // ids past the tokenizer's: never produced
        let eos = *model.config.eos_token_ids.first().ok_or("the model has no EOS token, so no grammar can end")?;
        let info = TokRxInfo::new(vocab as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = match model.tokenizer() {
            Ok(t) => Arc::new(ModelTokEnv { trie, tokenizer: t.hf().clone() }),
            // Loaded without its tokenizer (`bench`): no forced tokens, masks as usual.
            Err(_) => Arc::new(ApproximateTokEnv::new(trie)),
        };
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Arc::new(factory))
    }

    fn of(model: &Model) -> Result<Arc<ParserFactory>> {
        let v = model.grammar_vocab.get_or_init(|| Vocabulary { factory: Vocabulary::build(model) });
        v.factory.clone().map_err(Error::Constraint)
    }
}

/// The model's vocabulary with its own tokenizer, so that llguidance can turn text the grammar
/// forces (`{"name": "` after `{` in a schema with one required first property) into the tokens
/// the model would read for it: its fast-forward tokens.
struct ModelTokEnv {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// The tokenizer's tokens for `s`, if they spell exactly `s` (a normaliser that adds a
    /// prefix space would not); otherwise the trie's greedy tokenization, which always does.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let by_tokenizer = std::str::from_utf8(s)
            .ok()
            .and_then(|text| self.tokenizer.encode(text, false).ok())
            .map(|e| e.get_ids().to_vec())
            .filter(|ids| self.trie.decode_raw(ids) == s);
        by_tokenizer.unwrap_or_else(|| self.trie.greedy_tokenize(s))
    }
}

/// A compiled constraint and its parser state for one generation.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    spec: ConstraintSpec,
    vocab: usize,
    /// Full masks computed so far (the costly step), for benchmarks.
    masks: usize,
    /// The token that ends the output where the grammar may end.
    eos: u32,
}

impl Constraint {
    /// Compiles `spec` for `model`; an invalid or unsupported schema, regex or grammar is an
    /// [`Error::Constraint`] with the compiler's message, before any token is generated.
    pub fn new(model: &Model, spec: &ConstraintSpec) -> Result<Constraint> {
        let factory = Vocabulary::of(model)?;
        let grammar = spec.grammar()?;
        let parser = factory.create_parser(grammar).map_err(|e| spec.error(e))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(spec.error(e));
        }
        Ok(Constraint {
            matcher,
            spec: spec.clone(),
            vocab: factory.tok_env().tok_trie().vocab_size(),
            masks: 0,
            eos: factory.tok_env().tok_trie().eos_token(),
        })
    }

    /// The spec this was compiled from.
    pub fn spec(&self) -> &ConstraintSpec {
        &self.spec
    }

    /// Starts over (a new generation with the same constraint).
    pub fn reset(&mut self) -> Result<()> {
        self.matcher.reset().map_err(|e| self.error(e))
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        self.spec.error(e)
    }

    /// Whether the grammar can continue with `token` (checked without consuming it).
    pub fn allows(&mut self, token: u32) -> bool {
        (token as usize) < self.vocab && self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// How many full token masks this constraint has computed (each costs a walk of the token
    /// trie; a step whose token the grammar accepts as it is costs none).
    pub fn masks_computed(&self) -> usize {
        self.masks
    }

    /// The tokens the grammar allows next.
    fn mask(&mut self) -> Result<SimpleVob> {
        self.masks += 1;
        let m = self.matcher.compute_mask().map_err(|e| self.error(e))?;
        if m.is_zero() {
            return Err(self.error("no token can continue the output (an unsatisfiable constraint?)"));
        }
        Ok(m)
    }

    /// The one token the grammar forces next, if the text that must follow is fixed (llguidance's
    /// fast-forward tokens: the model's own tokenization of that text); `None` when there is a
    /// choice.
    pub fn forced(&mut self) -> Option<u32> {
        self.matcher.compute_ff_tokens().first().copied()
    }

    /// Sets every logit the grammar does not allow to −∞.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<()> {
        let m = self.mask()?;
        for (i, l) in logits.iter_mut().enumerate() {
            if i >= self.vocab || !m.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar by the token chosen.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| self.error(e))
    }

    /// The end-of-sequence token the grammar ends with.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The grammar has ended (its EOS consumed): nothing may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
