#!/usr/bin/env bash
# Seeds each fuzz target's corpus from the committed fixtures (docs/fuzzing.md).
#
#   bash fuzz/seed.sh [CORPUS_DIR]     (from the repository root; default $PEFTRT_FUZZ_CORPUS,
#                                       else ~/.cache/peftrt-fuzz/corpus)
#
# Seeds are named by their content hash, so rerunning adds nothing twice and never touches what
# the fuzzers added. The corpus stays out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
corpus=${1:-${PEFTRT_FUZZ_CORPUS:-$HOME/.cache/peftrt-fuzz/corpus}}
fx=tests/fixtures

# seed TARGET: stdin becomes one seed of TARGET.
seed() {
  local dir="$corpus/$1" tmp
  mkdir -p "$dir"
  tmp=$(mktemp "$dir/.seed.XXXXXX")
  cat >"$tmp"
  mv "$tmp" "$dir/seed-$(sha1sum "$tmp" | cut -c1-16)"
}
# byte N: one raw byte.
byte() { printf "\\x$(printf %02x "$1")"; }
# u16 N: two bytes, little-endian.
u16() { byte $(($1 & 255)); byte $(($1 >> 8 & 255)); }
# u32 N: four bytes, little-endian.
u32() { u16 $(($1 & 65535)); u16 $(($1 >> 16 & 65535)); }
# header_only FILE: a safetensors file's length prefix and JSON header, without the data.
header_only() { head -c $((8 + $(od -An -t u8 -N8 "$1"))) "$1"; }

# safetensors: the small files whole, the header (tensor table) of every file.
for f in $(find $fx -name '*.safetensors' | sort); do
  header_only "$f" | seed safetensors
  if [ "$(stat -c %s "$f")" -le 65536 ]; then seed safetensors <"$f"; fi
done

# gguf: mode byte 0 + the tiny GGUF; mode byte 1 + ggml type id + gguf-py's blocks of that type.
{ byte 0; cat runtime/tests/data/gguf/tiny_llama.gguf; } | seed gguf
for t in F32:0 F16:1 Q4_0:2 Q4_1:3 Q5_0:6 Q5_1:7 Q8_0:8 Q2_K:10 Q3_K:11 Q4_K:12 Q5_K:13 Q6_K:14 BF16:30; do
  { byte 1; byte "${t#*:}"; cat "runtime/tests/data/gguf/${t%%:*}.bin"; } | seed gguf
done

# config: every fixture model's config.json.
for f in $(find $fx -name config.json | sort); do seed config <"$f"; done

# adapter: u16 length of adapter_config.json, it, then adapter_model.safetensors.
for d in $(find $fx -name adapter_config.json -exec dirname {} \; | sort); do
  [ -f "$d/adapter_model.safetensors" ] || continue
  { u16 "$(stat -c %s "$d/adapter_config.json")"; cat "$d/adapter_config.json" "$d/adapter_model.safetensors"; } | seed adapter
done

# chat_template: every fixture's tokenizer_config.json.
for f in $(find $fx -name tokenizer_config.json | sort); do seed chat_template <"$f"; done
# ... and the other shapes of the file: a list of named templates; special tokens as objects; a
# template using what real ones use (namespace, loop, filters, raise_exception, bos_token).
cat <<'JSON' | seed chat_template
{"bos_token": {"content": "<|im_start|>"}, "eos_token": {"content": "<|im_end|>"},
 "chat_template": [{"name": "tool_use", "template": "{{ messages | tojson }}"},
                   {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"}]}
JSON
cat <<'JSON' | seed chat_template
{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
 "chat_template": "{{- bos_token }}{%- set ns = namespace(sys='') %}{%- for m in messages %}{%- if m['role'] == 'system' %}{%- set ns.sys = m['content'] | trim %}{%- elif m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m['role']) }}{%- else %}{{ '<|im_start|>' ~ m['role'] ~ '\n' ~ (ns.sys ~ '\n' if loop.index0 == 1 else '') ~ m['content'] | replace('\t', ' ') ~ eos_token ~ '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"}
JSON

# batch: request lines, as `peftrt batch --input` reads them.
while IFS= read -r line; do printf %s "$line" | seed batch; done < <(
  head -n 8 $fx/trainer/chat.jsonl
  echo '{"id": "a", "prompt": "Write a haiku about a lighthouse."}'
  echo '{"id": 7, "messages": [{"role": "user", "content": "Name three colours."}]}'
  echo '{"prompt": "x", "max_tokens": 4, "temperature": 0.5, "stop": ["\n"]}'
  echo '{"messages": [{"role": "user", "content": "JSON please"}], "response_format": {"type": "json_object"}}'
)

# ffi_text: mode 0 tokenize (buffer size, text); mode 1 detokenize (buffer size, skip_special,
# i32 ids); mode 2 chat template (NUL-separated role, content, ...); mode 3 generate (24 bytes of
# sampling parameters, stop strings up to 0xff, i32 prompt ids).
while IFS= read -r line; do
  { byte 0; byte 64; printf %s "$line"; } | seed ffi_text
  { byte 0; byte 1; printf %s "$line"; } | seed ffi_text
done < <(head -n 4 $fx/trainer/chat.jsonl; echo 'ünïcödé <|im_start|>user hi<|im_end|>')
{ byte 1; byte 64; byte 0; for i in 1 2 5 9 17 33 65 100 0 3; do u32 $i; done; } | seed ffi_text
{ byte 1; byte 8; byte 1; for i in 1 40 41 42 2; do u32 $i; done; } | seed ffi_text
{ byte 2; printf 'system\0You answer in one word.\0user\0Capital of France?\0assistant\0Paris.'; } | seed ffi_text
# temperature 0 (greedy), top_k 0, top_p 1.0, min_p 0, repetition penalty 1.0, 4 tokens.
{ byte 3; u32 0; byte 8; byte 8; byte 1; byte 5; u32 0x3f800000; u32 0; u32 0x3f800000; byte 0; byte 0; byte 0; byte 0
  printf '\n\0.'; byte 255; for i in 1 40 41 42 2; do u32 $i; done; } | seed ffi_text
# temperature 0.8, top_k 16, top_p 0.9, min_p 0.05, penalty 1.1, 6 tokens, no stop strings.
{ byte 3; u32 0x3f4ccccd; byte 24; byte 72; byte 3; byte 7; u32 0x3f666666; u32 0x3d4ccccd; u32 0x3f8ccccd
  byte 1; byte 0; byte 0; byte 0; for i in 1 7 9 30; do u32 $i; done; } | seed ffi_text

# openai_request: mode byte (even: chat, odd: completion) + a request body as clients send them.
{ byte 0; printf '{"model":"base","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":0.7,"top_p":0.9,"stop":["\n"],"seed":3,"stream":true,"stream_options":{"include_usage":true}}'; } | seed openai_request
{ byte 0; printf '{"model":"base","messages":[{"role":"user","content":[{"type":"text","text":"JSON please"}]}],"max_completion_tokens":16,"response_format":{"type":"json_schema","json_schema":{"name":"o","schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}}}'; } | seed openai_request
{ byte 0; printf '{"model":"base","messages":[{"role":"user","content":"x"}],"adapters":[{"name":"a","scale":0.5}],"response_format":{"type":"json_object"},"n":1}'; } | seed openai_request
{ byte 1; printf '{"model":"base","prompt":"Once upon a time","max_tokens":4,"temperature":0,"stop":"."}'; } | seed openai_request
{ byte 1; printf '{"model":"base","prompt":[1,2,3,4],"max_tokens":4,"ignore_eos":true,"stream":true}'; } | seed openai_request

for t in "$corpus"/*; do echo "$(basename "$t"): $(find "$t" -type f | wc -l) inputs"; done
