//! GGUF files: parsing, dequantisation and import into a Hugging Face model directory.
