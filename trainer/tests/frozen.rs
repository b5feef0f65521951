//! The loss path of issue #6's speed work: the head runs only at labelled positions, yet the
//! loss equals cross-entropy over the full logits; and the frozen base never requires or
//! receives gradients (only the LoRA weights do).

use peftrt_conformance::fixture;
use peftrt_trainer::base::Base;
use peftrt_trainer::data::{Batch, Dataset, Encoder, IGNORE};
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::loss::batch_loss_sum;
use peftrt_trainer::model::{BaseStorage, Pass};
use tch::{Device, Kind, Reduction};

#[test]
fn head_at_labelled_positions_gives_the_full_logits_loss_and_the_base_stays_frozen() {
    tch::set_num_threads(1);
    let base = Base::load(&fixture("tiny-llama"), BaseStorage::Float, Device::Cpu).unwrap();
    let enc = Encoder { tokenizer: base.runtime.tokenizer().unwrap(), eos: base.eos(), max_seq_len: 256 };
    let ds = Dataset::load(&fixture("trainer/chat.jsonl"), None, &enc).unwrap();
    let lora = LoraSet::from_adapter(
        &base.model.linear_shapes(),
        base.model.device,
        &fixture("trainer/llama-qv/init"),
        0.0,
        Init::Kaiming,
    )
    .unwrap();
    let all: Vec<_> = ds.examples.iter().collect();
    let batch = Batch::new(&all, 2).unwrap();

    let full = tch::no_grad(|| {
        let logits = base.model.forward(&batch.ids, Pass::new(Some(&lora), false)).unwrap();
        let vocab = logits.size()[2];
        logits.reshape([-1, vocab]).cross_entropy_loss::<tch::Tensor>(
            &batch.labels.reshape([-1]),
            None,
            Reduction::Sum,
            IGNORE,
            0.0,
        )
    })
    .double_value(&[]);
    let loss = batch_loss_sum(&base.model, &batch, Pass::new(Some(&lora), true)).unwrap();
    let at_targets = loss.double_value(&[]);
    assert!((full - at_targets).abs() <= 1e-5 * full, "full logits {full} vs labelled positions {at_targets}");

    loss.backward();
    for lin in base.model.linears() {
        let w = lin.weight(Kind::Float).unwrap();
        assert!(!w.requires_grad() && !w.grad().defined(), "{} has a gradient", lin.name);
    }
    let params = lora.named_parameters();
    assert!(!params.is_empty());
    for (name, p) in params {
        assert!(p.grad().defined(), "{name} has no gradient");
    }
}
