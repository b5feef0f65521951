//! Trainable LoRA layers, configured and initialised as PEFT does (peft/tuners/lora
//! `LoraConfig`, `LoraLayer.update_layer`, `reset_lora_parameters`), saved in PEFT's format.
//!
//! Which modules get a LoRA layer, and with which rank and alpha, is decided by the runtime's
//! [`AdapterConfig`] (`target_modules` as a suffix list, a full-match regex or `all-linear`;
//! `layers_to_transform`; `rank_pattern`/`alpha_pattern`): the trainer and the runtime cannot
//! disagree about it. The weights live in their own [`nn::VarStore`] under PEFT's key names
//! (`base_model.model.<module>.lora_A.weight`, `[r, in]`; `...lora_B.weight`, `[out, r]`), so
//! saving is a copy, and only they reach the optimiser.

use crate::error::{Error, Result};
use peftrt::adapter::{AdapterConfig, AdapterFile, Targets};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// How a fresh `lora_A` is drawn (`lora_B` starts at zero either way, so training starts from
/// the base model's outputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// `kaiming_uniform_(a=√5)`: uniform in ±1/√in (PEFT's default, `init_lora_weights=True`).
    Kaiming,
    /// Normal with std 1/r (`init_lora_weights="gaussian"`).
    Gaussian,
}

impl Init {
    pub fn parse(s: &str) -> Result<Init> {
        match s {
            "kaiming" => Ok(Init::Kaiming),
            "gaussian" => Ok(Init::Gaussian),
            other => Err(Error::Input(format!("--init {other}: expected kaiming or gaussian"))),
        }
    }

    /// The value PEFT records in `adapter_config.json`.
    pub(crate) fn peft_value(self) -> Value {
        match self {
            Init::Kaiming => json!(true),
            Init::Gaussian => json!("gaussian"),
        }
    }
}

/// The LoRA options of a run.
#[derive(Clone, Debug)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f64,
    /// `q_proj,v_proj`, `all-linear` or a regex.
    pub target: String,
    pub rslora: bool,
    pub init: Init,
    /// Only these decoder layers (`layers_to_transform`).
    pub layers: Option<Vec<usize>>,
    /// Start from this PEFT adapter's weights and configuration.
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target: "q_proj,v_proj".into(),
            rslora: false,
            init: Init::Kaiming,
            layers: None,
            init_adapter: None,
        }
    }
}

/// A linear layer of the base as LoRA sees it (PEFT's module name, `in_features`,
/// `out_features`): the base describes its layers with these, and LoRA layers attach by them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The layer's index in the base's order ([`peftrt::Model::linears`]).
    pub id: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

/// The `--target` option: `q_proj,v_proj` (module names or dotted suffixes), `all-linear`, or a
/// regular expression that must match a whole module name (anything with a regex
/// metacharacter, as PEFT treats a string `target_modules`).
pub fn parse_targets(s: &str) -> Result<Targets> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::Input("--target is empty; give module names (q_proj,v_proj), all-linear or a regex".into()));
    }
    if s == "all-linear" {
        return Ok(Targets::AllLinear);
    }
    if s.chars().any(|c| "\\^$*+?()[]{}|".contains(c)) {
        let re = regex::Regex::new(&format!("^(?:{s})$"))
            .map_err(|e| Error::Input(format!("--target {s}: not a regular expression: {e}")))?;
        return Ok(Targets::Regex(re));
    }
    let mut names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        return Err(Error::Input(format!("--target {s}: an empty module name between commas")));
    }
    // Sorted, as PEFT saves them (a set): the same targets always read the same.
    names.sort();
    names.dedup();
    Ok(Targets::List(names))
}

/// A LoRA configuration: what PEFT's `LoraConfig` holds, plus dropout and initialisation.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    /// Rank, alpha, rsLoRA, targets, layers, rank/alpha patterns (PEFT semantics).
    pub config: AdapterConfig,
    /// `lora_dropout`, applied to the layer input before `lora_A` while training.
    pub dropout: f64,
    pub init: Init,
}

impl LoraSpec {
    /// The configuration `o` gives (its `target` parsed by [`parse_targets`]), checked.
    pub fn from_options(o: &LoraOptions) -> Result<LoraSpec> {
        let targets = parse_targets(&o.target)?;
        let (r, alpha, dropout) = (o.r, o.alpha, o.dropout);
        if r == 0 {
            return Err(Error::Input("--r must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(Error::Input(format!("--dropout {dropout}: must be in [0, 1)")));
        }
        if !alpha.is_finite() {
            return Err(Error::Input(format!("--alpha {alpha}: must be a finite number")));
        }
        let config = AdapterConfig {
            r,
            alpha,
            rslora: o.rslora,
            use_dora: false,
            target_modules: targets,
            exclude_modules: Targets::Unspecified,
            layers: o.layers.clone(),
            rank_pattern: vec![],
            alpha_pattern: vec![],
            base_model: None,
        };
        Ok(LoraSpec { config, dropout, init: o.init })
    }

    /// `alpha / r`, or `alpha / √r` with rsLoRA, for a module (PEFT's `scaling`).
    pub fn scale_for(&self, module: &str) -> f64 {
        let (r, alpha) = (self.config.rank_for(module) as f64, f64::from(self.config.alpha_for(module)));
        if self.config.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// One module's LoRA weights (shallow handles on the [`nn::VarStore`] variables).
pub struct LoraLayer {
    /// The adapted module, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

/// The PEFT key of one of a module's LoRA weights.
pub fn peft_key(module: &str, part: &str) -> String {
    format!("base_model.model.{module}.{part}.weight")
}

/// All LoRA layers of one adapter, indexed by the base's linear-layer id.
pub struct LoraSet {
    pub spec: LoraSpec,
    vs: nn::VarStore,
    layers: Vec<Option<LoraLayer>>,
}

/// A tensor's values in f32, row-major, on the CPU.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&t.f_to_kind(Kind::Float)?.f_to(Device::Cpu)?.f_reshape([-1])?)?)
}

impl LoraSet {
    /// Fresh LoRA layers, on `device`, on every one of the base's `linears` that `spec`
    /// selects: `lora_A` drawn as `spec.init` says (from libtorch's generator: seed it first),
    /// `lora_B` zero.
    pub fn init(linears: &[LinearShape], device: Device, spec: LoraSpec) -> Result<LoraSet> {
        let selected = select(linears, &spec.config, None)?;
        let mut set = LoraSet { layers: Vec::new(), vs: nn::VarStore::new(device), spec };
        for lin in selected {
            let r = set.spec.config.rank_for(&lin.name) as i64;
            let opts = (Kind::Float, device);
            let mut a = Tensor::f_empty([r, lin.cols as i64], opts)?;
            match set.spec.init {
                Init::Kaiming => {
                    let bound = 1.0 / (lin.cols as f64).sqrt();
                    let _ = a.f_uniform_(-bound, bound)?;
                }
                Init::Gaussian => {
                    let _ = a.f_normal_(0.0, 1.0 / r as f64)?;
                }
            }
            let b = Tensor::f_zeros([lin.rows as i64, r], opts)?;
            set.add(lin, &a, &b)?;
        }
        Ok(set)
    }

    /// LoRA layers, on `device`, on the base's `linears`, starting from the weights of the PEFT
    /// adapter in `dir`. Its `adapter_config.json` defines rank, alpha, rsLoRA, targets and
    /// layers; `dropout` and `init` are the training run's.
    pub fn from_adapter(
        linears: &[LinearShape],
        device: Device,
        dir: &Path,
        dropout: f64,
        init: Init,
    ) -> Result<LoraSet> {
        let file = AdapterFile::open(dir)?;
        if file.config.use_dora {
            return Err(Error::Input(format!(
                "--init-adapter {}: a DoRA adapter (use_dora); the trainer trains plain LoRA only",
                dir.display()
            )));
        }
        let spec = LoraSpec { config: file.config.clone(), dropout, init };
        let in_file: Vec<&str> = file.modules.keys().map(String::as_str).collect();
        let selected = select(linears, &spec.config, Some(&in_file))?;
        let mut set = LoraSet { layers: Vec::new(), vs: nn::VarStore::new(device), spec };
        for lin in &selected {
            let t = file.modules.get(&lin.name).ok_or_else(|| {
                Error::Input(format!(
                    "--init-adapter {}: adapter_config.json selects {}, but adapter_model.safetensors has no weights for it",
                    dir.display(),
                    lin.name
                ))
            })?;
            let r = set.spec.config.rank_for(&lin.name);
            let load = |t: &peftrt::weights::Tensor, shape: [usize; 2]| -> Result<Tensor> {
                if t.shape != shape {
                    return Err(Error::Input(format!(
                        "--init-adapter {}: {} has shape {:?}, this base needs {:?}",
                        dir.display(),
                        t.name,
                        t.shape,
                        shape
                    )));
                }
                let v = t.to_f32_vec();
                Ok(Tensor::f_from_slice(&v)?.f_reshape([shape[0] as i64, shape[1] as i64])?.f_to(device)?)
            };
            let a = load(&t.a, [r, lin.cols])?;
            let b = load(&t.b, [lin.rows, r])?;
            set.add(lin, &a, &b)?;
        }
        if let Some(extra) = file.modules.keys().find(|m| !selected.iter().any(|l| &l.name == *m)) {
            return Err(Error::Input(format!(
                "--init-adapter {}: has weights for {extra}, which its adapter_config.json does not select for this base",
                dir.display()
            )));
        }
        Ok(set)
    }

    /// Registers a module's weights as trainable variables named by their PEFT keys.
    fn add(&mut self, lin: &LinearShape, a: &Tensor, b: &Tensor) -> Result<()> {
        let var = |part: &str, t: &Tensor| -> Result<Tensor> {
            let key = peft_key(&lin.name, part);
            let mut components: Vec<&str> = key.split('.').collect();
            let leaf = components.pop().unwrap_or("weight");
            let path = components.iter().fold(self.vs.root(), |p, c| p.sub(*c));
            Ok(path.f_var_copy(leaf, t)?)
        };
        let layer = LoraLayer {
            module: lin.name.clone(),
            a: var("lora_A", a)?,
            b: var("lora_B", b)?,
            scale: self.spec.scale_for(&lin.name),
            dropout: self.spec.dropout,
        };
        if self.layers.len() <= lin.id {
            self.layers.resize_with(lin.id + 1, || None);
        }
        self.layers[lin.id] = Some(layer);
        Ok(())
    }

    /// The LoRA layer on the base's linear layer `id`, if any.
    pub fn for_layer(&self, id: usize) -> Option<&LoraLayer> {
        self.layers.get(id).and_then(Option::as_ref)
    }

    /// The LoRA layers in base-layer order.
    pub fn layers(&self) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().flatten()
    }

    /// The trainable tensors in a fixed order (per layer: A, then B) with their PEFT keys.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.layers()
            .flat_map(|l| {
                [
                    (peft_key(&l.module, "lora_A"), l.a.shallow_clone()),
                    (peft_key(&l.module, "lora_B"), l.b.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Number of trainable parameters.
    pub fn n_params(&self) -> i64 {
        self.layers().map(|l| l.a.numel() as i64 + l.b.numel() as i64).sum()
    }

    /// The variable store holding exactly the trainable weights.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// `adapter_config.json` as PEFT writes it (loadable by `PeftModel.from_pretrained`).
    /// `target_modules` is written as PEFT saves it: `all-linear` expanded to the adapted
    /// modules' full names, a list sorted, a regex as the string.
    pub fn peft_config(&self, base_model_name: &str) -> Value {
        let c = &self.spec.config;
        let targets = match &c.target_modules {
            Targets::List(names) => {
                let mut names = names.clone();
                names.sort();
                names.dedup();
                json!(names)
            }
            Targets::Regex(_) => json!(c.target_modules.to_string()),
            Targets::AllLinear | Targets::Unspecified => {
                let mut names: Vec<&str> = self.layers().map(|l| l.module.as_str()).collect();
                names.sort();
                json!(names)
            }
        };
        let patterns = |p: &[(String, f64)]| -> Value { p.iter().map(|(k, v)| (k.clone(), json!(v))).collect() };
        json!({
            "alpha_pattern": patterns(&c.alpha_pattern.iter().map(|(k, v)| (k.clone(), f64::from(*v))).collect::<Vec<_>>()),
            "base_model_name_or_path": base_model_name,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": self.spec.init.peft_value(),
            "layers_pattern": c.layers.as_ref().map(|_| "layers"),
            "layers_to_transform": c.layers,
            // An integer when it is one, as PEFT types it (`lora_alpha: int`).
            "lora_alpha": if c.alpha.fract() == 0.0 && c.alpha.abs() < 1e9 { json!(c.alpha as i64) } else { json!(c.alpha) },
            "lora_dropout": self.spec.dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": c.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": c.rslora,
        })
    }
}

/// The base's `linears` that `config` selects, checked like PEFT checks them: every named
/// target must exist, and something must be selected. With `only` (an adapter file's modules,
/// when its config leaves `target_modules` unspecified) exactly those.
fn select<'a>(
    linears: &'a [LinearShape],
    config: &AdapterConfig,
    only: Option<&[&str]>,
) -> Result<Vec<&'a LinearShape>> {
    if let Targets::List(names) = &config.target_modules {
        for t in names {
            // PEFT's matching (a name or a dotted suffix), from the runtime's selection code.
            let one = AdapterConfig { target_modules: Targets::List(vec![t.clone()]), layers: None, ..config.clone() };
            let found = linears.iter().any(|l| one.selects(&l.name, false));
            if !found {
                let kinds = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"];
                return Err(Error::Input(format!(
                    "target module `{t}` matches no linear layer of this base model (its layers are {})",
                    kinds.join(", ")
                )));
            }
        }
    }
    let selected: Vec<&LinearShape> = match (&config.target_modules, only) {
        (Targets::Unspecified, Some(only)) => linears.iter().filter(|l| only.contains(&l.name.as_str())).collect(),
        (Targets::Unspecified, None) => {
            return Err(Error::Input("no target modules given (--target q_proj,v_proj, all-linear or a regex)".into()))
        }
        _ => linears.iter().filter(|l| config.selects(&l.name, l.name == "lm_head")).collect(),
    };
    if selected.is_empty() {
        return Err(Error::Input(format!(
            "target modules `{}`{} select no linear layer of this base model",
            config.target_modules,
            config.layers.as_ref().map(|l| format!(" in layers {l:?}")).unwrap_or_default()
        )));
    }
    Ok(selected)
}
