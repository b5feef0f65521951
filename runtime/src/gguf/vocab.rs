//! Rebuilding a Hugging Face `tokenizer.json` (and the token fields of `tokenizer_config.json`)
//! from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers that
//! `tokenizer.ggml.pre` names, following llama.cpp's `src/llama-vocab.cpp` (the regexes of
//! each `LLAMA_VOCAB_PRE_TYPE_*`) expressed as the `tokenizers` library's pre-tokenizers:
//!
//! | `tokenizer.ggml.pre`            | pre-tokenizer                                              |
//! |---------------------------------|------------------------------------------------------------|
//! | `default`, `gpt2`               | ByteLevel with the GPT-2 regex                             |
//! | `smollm`, `starcoder`, `refact` | Digits (each digit alone), then ByteLevel (GPT-2 regex)    |
//! | `llama-bpe`, `llama3`           | Split (Llama-3 regex), ByteLevel without regex; `ignore_merges` |
//! | `qwen2`                         | NFC normaliser, Split (Qwen2 regex), ByteLevel without regex |
//!
//! Token types (`tokenizer.ggml.token_type`, llama.cpp's `llama_token_type`): control (3) and
//! unknown (2) tokens become special added tokens, user-defined (4) tokens non-special added
//! tokens. The output is JSON written directly; tests load it with `tokenizers`.

use serde_json::{json, Map, Value as Json};

use super::file::GgufFile;
use crate::error::{Error, Result};

/// llama.cpp `LLAMA_TOKEN_TYPE_*` values.
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The Llama-3 split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, Llama-3's tokenizer.json).
/// The GPT-2 regex needs no constant: `ByteLevel` applies it when `use_regex` is true.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen2 split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`): digits one by one.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens and flags of a GGUF vocabulary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    /// `tokenizer.ggml.add_bos_token` (default: false for `gpt2` vocabularies).
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token` (default false).
    pub add_eos: bool,
}

impl SpecialTokens {
    /// The special tokens of a GGUF's vocabulary (without copying the vocabulary: what loading
    /// a model without its tokenizer needs).
    pub fn from_gguf(g: &GgufFile) -> Result<SpecialTokens> {
        let tokens = g
            .get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::config(g.path(), "tokenizer.ggml.tokens", "missing"))?;
        Self::read(g, &tokens)
    }

    /// The special tokens' ids from `g`'s metadata, with their text from `tokens`.
    fn read(g: &GgufFile, tokens: &[impl AsRef<str>]) -> Result<SpecialTokens> {
        let id = |key: &str| -> Result<Option<(u32, String)>> {
            match g.get_u32(key)? {
                None => Ok(None),
                Some(id) => match tokens.get(id as usize) {
                    Some(t) => Ok(Some((id, t.as_ref().to_string()))),
                    None => Err(Error::config(
                        g.path(),
                        key,
                        format!("token id {id} is outside the vocabulary of {}", tokens.len()),
                    )),
                },
            }
        };
        Ok(SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            add_bos: g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
            add_eos: g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        })
    }
}

/// The vocabulary of a GGUF file, read from `tokenizer.ggml.*`.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// `tokenizer.ggml.model`.
    pub model: String,
    /// `tokenizer.ggml.pre` (`default` when absent).
    pub pre: String,
    pub tokens: Vec<String>,
    /// One llama.cpp token type per token (1 = normal when the key is absent).
    pub token_types: Vec<i64>,
    /// BPE merges, as pairs.
    pub merges: Vec<(String, String)>,
    pub special: SpecialTokens,
}

impl Vocab {
    /// Reads the vocabulary, checking that its parts agree.
    pub fn from_gguf(g: &GgufFile) -> Result<Vocab> {
        let path = g.path();
        let model = g
            .get_str("tokenizer.ggml.model")?
            .ok_or_else(|| Error::config(path, "tokenizer.ggml.model", "missing: the file has no tokenizer"))?
            .to_string();
        let pre = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default").to_string();
        let tokens: Vec<String> = g
            .get_str_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::config(path, "tokenizer.ggml.tokens", "missing"))?
            .into_iter()
            .map(str::to_string)
            .collect();
        let token_types = match g.get_i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => {
                return Err(Error::config(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", t.len(), tokens.len()),
                ))
            }
            None => vec![1; tokens.len()],
        };
        let mut merges = Vec::new();
        for m in g.get_str_array("tokenizer.ggml.merges")?.unwrap_or_default() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| Error::config(path, "tokenizer.ggml.merges", format!("merge {m:?} has no space")))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let special = SpecialTokens::read(g, &tokens)?;
        Ok(Vocab { model, pre, tokens, token_types, merges, special })
    }

    /// The `tokenizer.json` document for this vocabulary.
    pub fn tokenizer_json(&self, path: &std::path::Path) -> Result<Json> {
        Ok(self.document(path, true)?.0)
    }

    /// The tokenizer [`Vocab::tokenizer_json`]'s document describes, built without writing the
    /// vocabulary and merges into JSON: the BPE model is made from them directly and the added
    /// tokens are added after it, as `tokenizers` does when it loads the document (its
    /// deserialiser buffers the 49k-entry model of SmolLM2 twice; this way a GGUF's tokenizer
    /// loads in a third of the time). Tests check that both serialise alike.
    pub fn tokenizer(&self, path: &std::path::Path) -> Result<tokenizers::Tokenizer> {
        let (skeleton, ignore_merges) = self.document(path, false)?;
        let fail = |e: &dyn std::fmt::Display| {
            Error::format(path, format!("cannot build the tokenizer from its vocabulary: {e}"))
        };
        let mut tokenizer =
            <tokenizers::Tokenizer as serde::Deserialize>::deserialize(skeleton).map_err(|e| fail(&e))?;
        let mut vocab = tokenizers::models::bpe::Vocab::default();
        vocab.reserve(self.tokens.len());
        for (id, t) in self.tokens.iter().enumerate() {
            // A duplicate keeps its first id, as the document does, with the same warning.
            match vocab.entry(t.clone()) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    log::warn!("{}: token {id} {t:?} is a duplicate; keeping the first id", path.display())
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(id as u32);
                }
            }
        }
        let bpe = tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, self.merges.clone())
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| fail(&e))?;
        tokenizer.with_model(bpe);
        let added: Vec<tokenizers::AddedToken> = self
            .added_tokens()
            .map(|(_, content, special)| tokenizers::AddedToken {
                content: content.to_string(),
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special,
            })
            .collect();
        tokenizer.add_tokens(&added);
        Ok(tokenizer)
    }

    /// The tokens that become added tokens (id, text, special): control and unknown tokens and
    /// the special ids as special ones, user-defined tokens as non-special ones.
    fn added_tokens(&self) -> impl Iterator<Item = (usize, &str, bool)> + '_ {
        let special_ids: Vec<u32> = [&self.special.bos, &self.special.eos, &self.special.unk, &self.special.pad]
            .into_iter()
            .flatten()
            .map(|(id, _)| *id)
            .collect();
        self.tokens.iter().zip(&self.token_types).enumerate().filter_map(move |(id, (t, &ty))| {
            let special = ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_UNKNOWN || special_ids.contains(&(id as u32));
            (special || ty == TOKEN_TYPE_USER_DEFINED).then_some((id, t.as_str(), special))
        })
    }

    /// The `tokenizer.json` document, and whether its model ignores merges; with `full` false,
    /// without the vocabulary, merges and added tokens ([`Vocab::tokenizer`] adds them).
    fn document(&self, path: &std::path::Path, full: bool) -> Result<(Json, bool)> {
        if self.model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "{}: tokenizer.ggml.model `{}`: only byte-level BPE (`gpt2`) vocabularies can be \
                 converted to tokenizer.json; use the original model's tokenizer.json instead",
                path.display(),
                self.model
            )));
        }
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |regex: &str| json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false});
        let (normalizer, pre_tokenizer, ignore_merges) = match self.pre.as_str() {
            "default" | "gpt2" | "gpt-2" => (Json::Null, byte_level(true), false),
            "smollm" | "starcoder" | "refact" => (
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]}),
                true,
            ),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]}),
                false,
            ),
            other => {
                return Err(Error::Unsupported(format!(
                    "{}: tokenizer.ggml.pre `{other}`: this pre-tokenizer is not supported \
                     (supported: default, gpt2, smollm, starcoder, refact, llama-bpe, llama3, \
                     qwen2); use the original model's tokenizer.json instead",
                    path.display()
                )))
            }
        };

        let mut vocab = Map::new();
        let mut added = Vec::new();
        let mut merges = Vec::new();
        if full {
            for (id, t) in self.tokens.iter().enumerate() {
                if vocab.contains_key(t) {
                    log::warn!("{}: token {id} {t:?} is a duplicate; keeping the first id", path.display());
                    continue;
                }
                vocab.insert(t.clone(), json!(id));
            }
            merges = self.merges.iter().map(|(a, b)| json!([a, b])).collect();
            added = self
                .added_tokens()
                .map(|(id, t, special)| {
                    json!({
                        "id": id, "content": t, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": special,
                    })
                })
                .collect();
        }

        let byte_level_post =
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post_processor = if self.special.add_bos || self.special.add_eos {
            let mut special_tokens = Map::new();
            let mut piece = |tok: &Option<(u32, String)>, wanted: bool, key: &str| -> Result<Vec<Json>> {
                if !wanted {
                    return Ok(vec![]);
                }
                let (id, t) =
                    tok.as_ref().ok_or_else(|| Error::config(path, key, "is true but the token id is missing"))?;
                special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
                Ok(vec![json!({"SpecialToken": {"id": t, "type_id": 0}})])
            };
            let bos = piece(&self.special.bos, self.special.add_bos, "tokenizer.ggml.add_bos_token")?;
            let eos = piece(&self.special.eos, self.special.add_eos, "tokenizer.ggml.add_eos_token")?;
            let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
            let with_type = |pieces: &[Json], type_id: u32| -> Vec<Json> {
                pieces
                    .iter()
                    .map(|p| json!({"SpecialToken": {"id": p["SpecialToken"]["id"], "type_id": type_id}}))
                    .collect()
            };
            let mut single = bos.clone();
            single.push(seq("A", 0));
            single.extend(eos.clone());
            let mut pair = single.clone();
            pair.extend(with_type(&bos, 1));
            pair.push(seq("B", 1));
            pair.extend(with_type(&eos, 1));
            json!({"type": "Sequence", "processors": [byte_level_post, {
                "type": "TemplateProcessing", "single": single, "pair": pair,
                "special_tokens": special_tokens}]})
        } else {
            byte_level_post
        };

        let document = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                "vocab": vocab, "merges": merges,
            },
        });
        Ok((document, ignore_merges))
    }

    /// The `tokenizer_config.json` document: special tokens, `add_bos_token`/`add_eos_token`,
    /// the chat template (`tokenizer.chat_template`) and `model_max_length`.
    pub fn tokenizer_config_json(&self, chat_template: Option<&str>, max_len: Option<u64>) -> Json {
        let mut cfg = Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("add_bos_token".into(), json!(self.special.add_bos));
        cfg.insert("add_eos_token".into(), json!(self.special.add_eos));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        for (key, tok) in [
            ("bos_token", &self.special.bos),
            ("eos_token", &self.special.eos),
            ("unk_token", &self.special.unk),
            ("pad_token", &self.special.pad),
        ] {
            cfg.insert(key.into(), tok.as_ref().map(|(_, t)| json!(t)).unwrap_or(Json::Null));
        }
        if let Some(t) = chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        if let Some(n) = max_len {
            cfg.insert("model_max_length".into(), json!(n));
        }
        Json::Object(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A byte-level vocabulary: three control tokens, the 256 byte characters, a few merges.
    fn vocab(pre: &str, add_bos: bool) -> Vocab {
        let mut tokens: Vec<String> = ["<s>", "</s>", "<tool>"].map(String::from).to_vec();
        let mut types = vec![TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED];
        // GPT-2's printable stand-ins for the 256 bytes.
        let mut n = 0;
        for b in 0u32..256 {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges: Vec<(String, String)> = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2"), ("12", "3")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
        Vocab {
            model: "gpt2".into(),
            pre: pre.into(),
            tokens,
            token_types: types,
            merges,
            special: SpecialTokens {
                bos: Some((0, "<s>".into())),
                eos: Some((1, "</s>".into())),
                unk: None,
                pad: None,
                add_bos,
                add_eos: false,
            },
        }
    }

    fn tokenizer(pre: &str, add_bos: bool) -> tokenizers::Tokenizer {
        tokenizer_from(&vocab(pre, add_bos))
    }

    /// `v`'s `tokenizer.json` as `tokenizers` loads it.
    fn tokenizer_from(v: &Vocab) -> tokenizers::Tokenizer {
        let json = v.tokenizer_json(Path::new("x.gguf")).unwrap();
        json.to_string().parse::<tokenizers::Tokenizer>().unwrap()
    }

    fn tokens(t: &tokenizers::Tokenizer, text: &str, special: bool) -> Vec<String> {
        t.encode(text, special).unwrap().get_tokens().to_vec()
    }

    #[test]
    fn every_supported_pre_type_loads_and_splits_digits_as_its_model_does() {
        // GPT-2: " 123" is one pre-token, so the digit merges apply.
        let gpt2 = tokenizer("gpt2", false);
        assert_eq!(tokens(&gpt2, " the 123", false), ["Ġthe", "Ġ", "123"]);
        // SmolLM / StarCoder: digits one by one.
        assert_eq!(tokens(&tokenizer("smollm", false), " the 123", false), ["Ġthe", "Ġ", "1", "2", "3"]);
        // Llama 3: up to three digits together; Qwen2: one by one.
        assert_eq!(tokens(&tokenizer("llama-bpe", false), "1234", false), ["123", "4"]);
        assert_eq!(tokens(&tokenizer("qwen2", false), "1234", false), ["1", "2", "3", "4"]);
        // Control tokens are special, user-defined ones added but not special.
        let t = tokenizer("llama3", false);
        assert_eq!(tokens(&t, "<s>the<tool>", false), ["<s>", "t", "he", "<tool>"]);
        let ids = t.encode("<s>the<tool>", false).unwrap().get_ids().to_vec();
        let dec = t.decode(&ids, true).unwrap();
        assert_eq!(dec, "the<tool>");
    }

    #[test]
    fn the_direct_build_equals_the_document_loaded_by_tokenizers() {
        for pre in ["gpt2", "smollm", "llama-bpe", "qwen2"] {
            for add_bos in [false, true] {
                let mut v = vocab(pre, add_bos);
                // A duplicate keeps its first id either way.
                v.tokens.push("he".into());
                v.token_types.push(1);
                let path = Path::new("x.gguf");
                let direct = v.tokenizer(path).unwrap();
                let loaded = tokenizer_from(&v);
                assert_eq!(direct.to_string(false).unwrap(), loaded.to_string(false).unwrap(), "{pre} {add_bos}");
                for text in ["<s>the 1234 <tool> he", " Ġthe\n\n12"] {
                    for special in [false, true] {
                        let (a, b) = (direct.encode(text, special).unwrap(), loaded.encode(text, special).unwrap());
                        assert_eq!(a.get_ids(), b.get_ids(), "{pre} {add_bos} {text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn bos_is_added_only_when_the_gguf_asks() {
        assert_eq!(tokens(&tokenizer("gpt2", true), "the", true), ["<s>", "t", "he"]);
        assert_eq!(tokens(&tokenizer("gpt2", false), "the", true), ["t", "he"]);
    }

    #[test]
    fn unsupported_pre_and_models_are_named() {
        let err = vocab("deepseek-llm", false).tokenizer_json(Path::new("m.gguf")).unwrap_err().to_string();
        assert!(err.contains("m.gguf") && err.contains("`deepseek-llm`"), "{err}");
        let mut v = vocab("gpt2", false);
        v.model = "llama".into();
        let err = v.tokenizer_json(Path::new("m.gguf")).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.model `llama`"), "{err}");
    }
}
