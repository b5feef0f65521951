//! Conformance tests: the runtime against reference outputs from Hugging Face transformers.
//! The tests live in `tests/`; this library holds their shared helpers.
