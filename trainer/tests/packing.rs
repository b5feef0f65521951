//! `--pack`: several examples in one row, each attending only to itself with positions from 0,
//! give the same losses as the examples one per row.

use peftrt_conformance::fixture;
use peftrt_trainer::base::Base;
use peftrt_trainer::data::{pack_rows, Batch, Dataset, Encoder};
use peftrt_trainer::lora::{Init, LoraSet};
use peftrt_trainer::loss::batch_loss_sum;
use peftrt_trainer::model::{BaseStorage, Pass};
use peftrt_trainer::train::{train, TrainOptions};
use tch::Device;

#[test]
fn packed_rows_compute_what_separate_rows_do() {
    tch::set_num_threads(1);
    for (base_name, data, adapter) in
        [("tiny-llama", "chat.jsonl", "llama-qv"), ("tiny-qwen2", "alpaca.jsonl", "qwen2-all-rslora")]
    {
        let base = Base::load(&fixture(base_name), BaseStorage::Float, Device::Cpu).unwrap();
        let enc = Encoder { tokenizer: base.runtime.tokenizer().unwrap(), eos: base.eos(), max_seq_len: 256 };
        let ds = Dataset::load(&fixture(&format!("trainer/{data}")), None, &enc).unwrap();
        let lora = LoraSet::from_adapter(
            &base.model.linear_shapes(),
            base.model.device,
            &fixture(&format!("trainer/{adapter}/init")),
            0.0,
            Init::Kaiming,
        )
        .unwrap();
        let all: Vec<_> = ds.examples.iter().collect();
        let separate = Batch::new(&all, 2).unwrap();
        let lens: Vec<usize> = ds.examples.iter().map(|e| e.ids.len()).collect();
        let order: Vec<usize> = (0..lens.len()).collect();
        let rows = pack_rows(&order, &lens, 256);
        assert!(rows.len() < lens.len() && rows.iter().any(|r| r.len() >= 2), "{rows:?}");
        let rows: Vec<Vec<_>> = rows.iter().map(|r| r.iter().map(|&i| &ds.examples[i]).collect()).collect();
        let packed = Batch::packed(&rows, 2).unwrap();
        assert_eq!(packed.n_targets, separate.n_targets);
        let value = |b: &Batch| {
            tch::no_grad(|| batch_loss_sum(&base.model, b, Pass::new(Some(&lora), false))).unwrap().double_value(&[])
        };
        let (a, b) = (value(&separate), value(&packed));
        eprintln!("{base_name}: separate {a}, packed {b}");
        assert!((a - b).abs() <= 1e-5 * a, "{base_name}: separate rows {a} vs packed rows {b}");
    }
}

#[test]
fn packed_training_runs_and_learns() {
    let d = tempfile::tempdir().unwrap();
    let mut o = TrainOptions::new(fixture("tiny-llama"), fixture("trainer/chat.jsonl"), d.path().join("a"));
    o.pack = true;
    o.max_seq_len = 160;
    o.batch_size = 1;
    o.lr = 1e-2;
    o.lora.dropout = 0.0;
    o.shuffle = false;
    o.epochs = 6.0;
    o.schedule = peftrt_trainer::optim::Schedule::Constant;
    let r = train(&o).unwrap();
    // Six examples of 53–100 tokens in rows of ≤160: fewer steps per epoch than examples.
    assert!(r.losses.len() < 6 * 6 && r.losses.len().is_multiple_of(6), "{} steps", r.losses.len());
    let per_epoch = r.losses.len() / 6;
    assert!(r.losses[r.losses.len() - per_epoch] < 0.7 * r.losses[0], "{:?}", r.losses);
}
