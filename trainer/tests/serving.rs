//! Serving at scale (issue #24): the trainer's adapter has what vLLM's LoRA loader needs
//! (`vllm serve BASE --enable-lora --lora-modules name=DIR`). PEFT loading it is
//! conformance.rs's `peft_loads_the_trained_adapter`.
//!
//! vLLM's rules, as its loader reads an adapter (vllm/lora/peft_helper.py `PEFTHelper`,
//! vllm/lora/utils.py `parse_fine_tuned_lora_name`, the `check_unexpected_modules` of
//! vllm/lora/models.py):
//! - `adapter_config.json` has `r`, `lora_alpha` and `target_modules` (required fields);
//!   `modules_to_save` is null or absent; `use_dora` is false; `use_rslora` selects
//!   `lora_alpha / sqrt(r)`, else `lora_alpha / r`;
//! - every tensor of `adapter_model.safetensors` is `base_model.model.<module>.lora_A.weight` or
//!   `….lora_B.weight` (or `lora_embedding_A/B`), and the last component of `<module>` is a module
//!   vLLM can adapt in a Llama-family model (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
//!   `gate_proj`, `up_proj`, `down_proj`; it packs them into `qkv_proj` and `gate_up_proj`);
//! - `r` is at most the server's `--max-lora-rank` (16 unless raised), and `lora_A` is
//!   `[r, in]`, `lora_B` `[out, r]`.

use peftrt::weights::WeightStore;
use peftrt_conformance::fixture;
use peftrt_trainer::train::{train, TrainOptions};
use serde_json::Value;
use tch::Device;

const VLLM_LLAMA_LORA_MODULES: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const VLLM_DEFAULT_MAX_LORA_RANK: u64 = 16;

/// The checks vLLM's loader makes; `Err` says which one fails.
fn vllm_accepts(dir: &std::path::Path) -> Result<(), String> {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    for key in ["r", "lora_alpha", "target_modules"] {
        if config.get(key).is_none_or(Value::is_null) {
            return Err(format!("adapter_config.json has no {key}"));
        }
    }
    if config.get("modules_to_save").is_some_and(|v| !v.is_null()) {
        return Err("modules_to_save must be null".into());
    }
    if config.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err("vLLM does not load DoRA".into());
    }
    let r = config["r"].as_u64().ok_or("r is not an integer")?;
    if r > VLLM_DEFAULT_MAX_LORA_RANK {
        return Err(format!("r {r} above vLLM's default --max-lora-rank"));
    }
    // SAFETY: a test file, not modified while mapped.
    let store = unsafe { WeightStore::open_file(&dir.join("adapter_model.safetensors")).unwrap() };
    for t in store.tensors() {
        let parts: Vec<&str> = t.name.split('.').collect();
        let ok_prefix = parts.len() > 4 && parts[0] == "base_model" && parts[1] == "model";
        let (module, is_a) = match parts.as_slice() {
            [.., "lora_A", "weight"] => (&parts[2..parts.len() - 2], true),
            [.., "lora_B", "weight"] => (&parts[2..parts.len() - 2], false),
            _ => return Err(format!("{}: not a LoRA weight name vLLM parses", t.name)),
        };
        if !ok_prefix {
            return Err(format!("{}: no base_model.model. prefix", t.name));
        }
        let last = module.last().copied().unwrap_or("");
        if !VLLM_LLAMA_LORA_MODULES.contains(&last) {
            return Err(format!("{}: vLLM cannot adapt module {last}", t.name));
        }
        let rank_axis = if is_a { 0 } else { 1 };
        if t.shape.len() != 2 || t.shape[rank_axis] as u64 != r {
            return Err(format!("{}: shape {:?} for r {r}", t.name, t.shape));
        }
    }
    Ok(())
}

#[test]
fn the_trainers_adapter_is_what_vllm_loads() {
    tch::set_num_threads(1);
    for (target, extra) in [("q_proj,v_proj", false), ("all-linear", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), out.clone());
        o.lora.target = target.into();
        o.lora.rslora = extra;
        o.max_steps = Some(1);
        o.batch_size = 2;
        o.max_seq_len = 100;
        o.device = Device::Cpu;
        train(&o).unwrap();
        vllm_accepts(&out).unwrap_or_else(|e| panic!("{target}: {e}"));
        // The names exactly as PEFT writes them (and vLLM parses).
        // SAFETY: a test file, not modified while mapped.
        let store = unsafe { WeightStore::open_file(&out.join("adapter_model.safetensors")).unwrap() };
        assert!(store.get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").is_ok());
        assert!(store.get("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").is_ok());
    }
}

/// The checks themselves refuse what vLLM refuses.
#[test]
fn vllm_checks_refuse_what_vllm_refuses() {
    let dir = fixture("adapters/llama-dora");
    assert!(vllm_accepts(&dir).unwrap_err().contains("DoRA"));
    assert!(vllm_accepts(&fixture("adapters/llama-qv")).is_ok());
}
