//! `peftrt quantize`: a float model directory to an NF4 one, in exactly the layout (and with
//! exactly the bytes) transformers + bitsandbytes save a 4-bit model, so that the result loads
//! in transformers and a QLoRA adapter trained on it meets the same values here.

use crate::adapter::suffix_match;
use crate::error::{Error, Result};
use crate::merge::MERGED_FROM_NF4_KEY;
use crate::model::{LoadOptions, Model};
use crate::nf4::{self, Scales, BLOCKSIZES, NESTED_BLOCKSIZE};
use crate::output::{copy_model_files, write_dir_atomically, write_safetensors_bytes, TensorSpec};
use crate::weights::DType;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// Options for [`quantize_model`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Elements per scale: one of bitsandbytes' [`BLOCKSIZES`] (64 by default, as QLoRA).
    pub blocksize: usize,
    /// Quantise the scales too (bitsandbytes' `compress_statistics`, QLoRA's default).
    pub double_quant: bool,
    /// Decoder linear layers to keep in float, as module names or suffixes (`down_proj`,
    /// `layers.0.mlp.down_proj`).
    pub keep: Vec<String>,
    /// Quantise a model that `peftrt merge` made from an NF4 base (rounds the merged weights to
    /// 4 bits a second time).
    pub requantize_merged: bool,
    /// Quantise the output head too (a tied head becomes its own NF4 `lm_head`; the input
    /// embeddings keep their dtype). Decode reads the head once per token, so on small models
    /// it is a large share of the bytes; it costs some accuracy (see `peftrt perplexity`).
    pub quantize_head: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            blocksize: 64,
            double_quant: true,
            keep: Vec::new(),
            requantize_merged: false,
            quantize_head: false,
        }
    }
}

/// What [`quantize_model`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeSummary {
    pub quantized_layers: usize,
    pub kept_layers: usize,
    /// Bytes of `model.safetensors`.
    pub bytes: u64,
}

/// Quantises every linear layer inside the decoder blocks of `model_dir` (but `opts.keep`) to
/// NF4 and writes the model to `out_dir`; embeddings, norms and the output head keep their
/// dtype. Atomic: on error nothing is left behind.
pub fn quantize_model(model_dir: &Path, out_dir: &Path, opts: &QuantizeOptions) -> Result<QuantizeSummary> {
    if out_dir.exists() {
        return Err(Error::Input(format!("{} already exists; choose a new output directory", out_dir.display())));
    }
    if !BLOCKSIZES.contains(&opts.blocksize) {
        return Err(Error::Input(format!("--blocksize {}: bitsandbytes accepts {BLOCKSIZES:?}", opts.blocksize)));
    }
    let model = Model::load(model_dir, &LoadOptions { no_tokenizer: true })?;
    if model.is_gguf() {
        return Err(Error::Unsupported(format!(
            "{} is a GGUF file: NF4 is made from float weights; `peftrt import` it into a directory first \
             (or serve the GGUF as it is)",
            model_dir.display()
        )));
    }
    if model.linears().any(|l| l.nf4.is_some()) {
        return Err(Error::Input(format!("{} is already quantised to NF4", model_dir.display())));
    }
    let cfg_path = model_dir.join("config.json");
    let cfg_text = crate::fsutil::read_text_file(&cfg_path, crate::fsutil::MAX_JSON_BYTES)?;
    if cfg_text.contains(MERGED_FROM_NF4_KEY) {
        let merged = serde_json::from_str::<serde_json::Value>(&cfg_text)
            .ok()
            .and_then(|v| v.get(MERGED_FROM_NF4_KEY).and_then(|x| x.as_bool()))
            .unwrap_or(false);
        if merged {
            let msg = format!(
                "{} was merged onto a dequantised NF4 base: quantising it again rounds the base weights a second \
                 time and moves them away from the values the adapter was trained against",
                model_dir.display()
            );
            if !opts.requantize_merged {
                return Err(Error::Input(format!(
                    "{msg}. Serve the adapter unmerged on the NF4 base instead, or pass --requantize-merged"
                )));
            }
            log::warn!("{msg}; quantising anyway as asked");
            eprintln!("warning: {msg}");
        }
    }
    for k in &opts.keep {
        if !model.layers.iter().flat_map(|l| l.linears()).any(|l| suffix_match(&l.name, k)) {
            return Err(Error::Input(format!("--keep {k}: no linear layer of the decoder blocks is called that")));
        }
    }
    // Which weights to quantise, by tensor name.
    let targets: HashMap<String, (usize, usize)> = model
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .filter(|l| !opts.keep.iter().any(|k| suffix_match(&l.name, k)))
        .map(|l| (format!("{}.weight", l.name), (l.rows, l.cols)))
        .chain(opts.quantize_head.then(|| ("lm_head.weight".to_string(), (model.lm_head.rows, model.lm_head.cols))))
        .collect();
    let tied = model.config.tie_word_embeddings;

    // Pass 1: the header needs each quant_state JSON, which holds the scales' mean.
    let mut tensors: Vec<(String, &crate::weights::Tensor)> =
        model.store().tensors().into_iter().map(|t| (t.name.clone(), t)).collect();
    if opts.quantize_head && tied {
        // The tied head becomes a tensor of its own (the embeddings stay as they are).
        tensors.push(("lm_head.weight".into(), &model.embed_tokens));
    }
    let mut specs = Vec::new();
    let mut sources = Vec::new(); // per spec: (source tensor index, part)
                                  // Per source tensor: its stored block scales, computed here (the JSON needs their mean) and
                                  // written in pass 2 (small: one or four bytes per block of 64 weights).
    let mut scales: Vec<Option<Scales>> = vec![None; tensors.len()];
    for (ti, (tname, t)) in tensors.iter().enumerate() {
        let Some(&(rows, cols)) = targets.get(tname) else {
            specs.push(TensorSpec { name: tname.clone(), shape: t.shape.clone(), dtype: t.dtype });
            sources.push((ti, Part::Copy));
            continue;
        };
        let x = t.to_f32_vec();
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::tensor(tname, format!("element {i} is {}: cannot quantise non-finite weights", x[i])));
        }
        let n = rows * cols;
        let nb = n.div_ceil(opts.blocksize);
        // Python's json.dumps of bitsandbytes' dict, in its key order.
        let state = format!(
            r#"{{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": [{rows}, {cols}]"#,
            opts.blocksize,
            t.dtype.torch_name()
        );
        let name = tname;
        let mut push = |suffix: &str, shape: Vec<usize>, dtype: DType, part: Part| {
            specs.push(TensorSpec { name: format!("{name}{suffix}"), shape, dtype });
            sources.push((ti, part));
        };
        push("", vec![n.div_ceil(2), 1], DType::U8, Part::Codes);
        let stored = nf4::quantize_scales(nf4::block_absmax(&x, opts.blocksize), opts.double_quant);
        if let Scales::Double { offset, .. } = &stored {
            let text = format!(
                r#"{state}, "nested_blocksize": {NESTED_BLOCKSIZE}, "nested_dtype": "float32", "nested_offset": {}}}"#,
                nf4::python_float_repr(f64::from(*offset))
            );
            push(".absmax", vec![nb], DType::U8, Part::Absmax);
            push(".nested_absmax", vec![nb.div_ceil(NESTED_BLOCKSIZE)], DType::F32, Part::NestedAbsmax);
            push(".nested_quant_map", vec![256], DType::F32, Part::NestedMap);
            push(".quant_map", vec![16], DType::F32, Part::Map);
            push(".quant_state.bitsandbytes__nf4", vec![text.len()], DType::U8, Part::State(text));
        } else {
            let text = format!("{state}}}");
            push(".absmax", vec![nb], DType::F32, Part::Absmax);
            push(".quant_map", vec![16], DType::F32, Part::Map);
            push(".quant_state.bitsandbytes__nf4", vec![text.len()], DType::U8, Part::State(text));
        }
        scales[ti] = Some(stored);
    }

    // Widest elements first, so every float tensor stays aligned in the file (the U8 codes and
    // odd-sized quant_state JSON come last) and loads without a copy.
    let mut order: Vec<usize> = (0..specs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(specs[i].dtype.size()));
    let specs: Vec<TensorSpec> = order.iter().map(|&i| specs[i].clone()).collect();
    let sources: Vec<(usize, Part)> = order.iter().map(|&i| sources[i].clone()).collect();

    // Pass 2: stream the tensors; a layer's codes are computed when they are written.
    let quantized_layers = targets.len();
    let kept_layers = model.layers.len() * 7 + usize::from(opts.quantize_head) - quantized_layers;
    let blocksize = opts.blocksize;
    let double_quant = opts.double_quant;
    let bytes = write_dir_atomically(out_dir, |tmp| {
        let path = tmp.join("model.safetensors");
        write_safetensors_bytes(&path, &specs, |i, out| {
            let (ti, part) = &sources[i];
            let t = tensors[*ti].1;
            let f32s = |v: &[f32], out: &mut Vec<u8>| v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            let stored = || scales[*ti].as_ref().expect("scales computed in pass 1");
            match part {
                Part::Copy => {
                    t.check_finite()?;
                    out.extend_from_slice(t.bytes());
                }
                Part::Codes => {
                    let x = t.to_f32_vec();
                    out.extend_from_slice(&nf4::quantize_codes(&x, blocksize, &nf4::block_absmax(&x, blocksize)));
                }
                Part::Absmax => match stored() {
                    Scales::F32(a) => f32s(a, out),
                    Scales::Double { codes, .. } => out.extend_from_slice(codes),
                },
                Part::NestedAbsmax => match stored() {
                    Scales::Double { nested_absmax, .. } => f32s(nested_absmax, out),
                    Scales::F32(_) => unreachable!("nested scales are listed only for double quantisation"),
                },
                Part::NestedMap => f32s(&nf4::dynamic_map(), out),
                Part::Map => f32s(&nf4::NF4_TABLE, out),
                Part::State(text) => out.extend_from_slice(text.as_bytes()),
            }
            Ok(())
        })?;
        copy_model_files(model_dir, tmp, |v| {
            v["quantization_config"] = json!({
                "_load_in_4bit": true,
                "_load_in_8bit": false,
                "bnb_4bit_compute_dtype": "float32",
                "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": double_quant,
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                // transformers converts every nn.Linear but these to Linear4bit when loading.
                "llm_int8_skip_modules": if opts.quantize_head {
                    json!(opts.keep) // an explicit list: transformers converts lm_head too
                } else if opts.keep.is_empty() {
                    serde_json::Value::Null
                } else {
                    json!(std::iter::once("lm_head".to_string()).chain(opts.keep.iter().cloned()).collect::<Vec<_>>())
                },
                "llm_int8_threshold": 6.0,
                "load_in_4bit": true,
                "load_in_8bit": false,
                "quant_method": "bitsandbytes",
            });
            if let Some(obj) = v.as_object_mut() {
                obj.remove(MERGED_FROM_NF4_KEY);
            }
            if opts.quantize_head && tied {
                v["tie_word_embeddings"] = false.into();
            }
        })?;
        std::fs::metadata(&path).map(|m| m.len()).map_err(|e| Error::io(&path, e))
    })?;
    Ok(QuantizeSummary { quantized_layers, kept_layers, bytes })
}

/// What a tensor of the output is made from.
#[derive(Clone)]
enum Part {
    Copy,
    Codes,
    Absmax,
    NestedAbsmax,
    NestedMap,
    Map,
    State(String),
}
