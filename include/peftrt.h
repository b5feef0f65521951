/*
 * peftrt.h — the C API of peftrt: CPU inference of Llama-family models (llama, mistral, qwen2)
 * with LoRA/DoRA adapters in the Hugging Face PEFT format, applied unmerged and switched per
 * session.
 *
 * Link with libpeftrt (shared or static): `pkg-config --cflags --libs peftrt`.
 *
 * Objects
 *   peftrt_model    an immutable model (memory-mapped weights, tokenizer, chat template).
 *   peftrt_adapter  a LoRA/DoRA adapter loaded for one model.
 *   peftrt_session  one conversation: KV cache, activation buffers, thread pool, sampler,
 *                   active adapters with their scales.
 *   peftrt_engine   many requests at once on one model (continuous batching), each with its
 *                   own adapters and scales, sampling, constraint and callbacks.
 *
 * Threads
 *   A model and its adapters are read-only once loaded: any number of threads may use them at
 *   once (tokenize, chat template, create sessions, load more adapters). A session is used by
 *   one thread at a time; a second thread calling into a session while it is busy gets
 *   PEFTRT_ERR_BUSY instead of a data race. peftrt_session_cancel() is the exception: any
 *   thread may call it at any time. Each function below says which rule it follows.
 *   Freeing a handle while another thread calls into it is safe: each call holds its own
 *   reference to the object from its start to its return, so a call that started before the
 *   free finishes on a live object (which is destroyed when the last such call returns), and
 *   a call that starts after it gets PEFTRT_ERR_INVALID_HANDLE. peftrt_session_free() instead
 *   refuses with PEFTRT_ERR_BUSY while any call is using the session.
 *
 * Lifetimes
 *   Adapters and sessions keep their model alive, and sessions keep their active adapters
 *   alive: the free functions may be called in any order. Pointers returned by the library
 *   (logits, strings) stay valid as long as each function documents.
 *
 * Errors
 *   Functions return a peftrt_status (0 = PEFTRT_OK, negative = error), a handle (NULL on
 *   error), or for buffer-filling functions a size (see below). After a failure,
 *   peftrt_last_status() and peftrt_last_error() describe it for the calling thread. Passing
 *   NULL where a pointer is required, a handle that was already freed (detected while its
 *   address is not reused), invalid UTF-8 or an out-of-range token id is an error, never a
 *   crash. Internal errors (Rust panics) are caught at the boundary: PEFTRT_ERR_INTERNAL.
 *   Files are judged by one rule:
 *     PEFTRT_ERR_IO           the OS could not open or read a file or directory: it is missing
 *                             (a model or adapter directory, or a file it must contain, such as
 *                             config.json, model.safetensors or a shard, tokenizer.json,
 *                             adapter_config.json, adapter_model.safetensors), unreadable, or
 *                             not a directory where one is needed;
 *     PEFTRT_ERR_FORMAT       a file was read but its content is malformed: invalid JSON, a
 *                             wrong type or an invalid value (NaN, an EOS id outside the
 *                             vocabulary), a truncated or lying safetensors header, a missing
 *                             tensor, shapes that disagree with config.json;
 *     PEFTRT_ERR_UNSUPPORTED  well-formed, but a feature peftrt does not run: another
 *                             architecture (model_type), rope type, quantisation method, PEFT
 *                             method (IA3, ...), `bias` other than "none", modules_to_save,
 *                             other LoRA variants, a tensor dtype (I64, ...), or an adapter only
 *                             as adapter_model.bin (pickle).
 *   A special file (a FIFO, a device) where a file is expected is refused with IO or FORMAT,
 *   never read until it ends.
 *
 * Buffer-filling functions
 *   return the number of elements written (>= 0). If the buffer is too small they write
 *   nothing and return minus the size it needs (so `-n` is the size to allocate). On any other
 *   error they return PEFTRT_BUFFER_ERROR (INT32_MIN) and set the last status and error.
 *
 * Params structs
 *   start with `struct_size`. Get them from peftrt_*_default_params() (which sets it), then
 *   change fields: a later library version accepts structs from callers built against this
 *   header, and fields added later take their defaults. Passing NULL means the defaults.
 */
#ifndef PEFTRT_H
#define PEFTRT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PEFTRT_VERSION_MAJOR 0
#define PEFTRT_VERSION_MINOR 1
#define PEFTRT_VERSION_PATCH 0
#define PEFTRT_VERSION_STRING "0.1.0"

/* Returned by buffer-filling functions on an error other than a short buffer. */
#define PEFTRT_BUFFER_ERROR INT32_MIN

#ifdef __cplusplus
extern "C" {
#endif

typedef struct peftrt_model peftrt_model;
typedef struct peftrt_adapter peftrt_adapter;
typedef struct peftrt_session peftrt_session;
typedef struct peftrt_engine peftrt_engine;

/* A token id: 0 <= id < the model's vocab_size. */
typedef int32_t peftrt_token;

typedef enum peftrt_status {
    PEFTRT_OK = 0,
    /* A NULL pointer where one is required, invalid UTF-8, a token id or value out of range,
       a params struct with an unknown struct_size. */
    PEFTRT_ERR_INVALID_ARGUMENT = -1,
    /* A handle that is not a live handle of the expected kind (freed already, or not one). */
    PEFTRT_ERR_INVALID_HANDLE = -2,
    /* A file or directory is missing or cannot be read. */
    PEFTRT_ERR_IO = -3,
    /* A model or adapter file is malformed (config, tensors, JSON). */
    PEFTRT_ERR_FORMAT = -4,
    /* The model or adapter uses a feature peftrt does not implement. */
    PEFTRT_ERR_UNSUPPORTED = -5,
    /* The adapter does not fit this model: another base model (fingerprint), architecture,
       shape, or it was loaded for another model handle. */
    PEFTRT_ERR_ADAPTER_MISMATCH = -6,
    /* Tokenizer or chat-template failure, or the model was loaded without its tokenizer or
       has no chat template. */
    PEFTRT_ERR_TOKENIZER = -7,
    /* The tokens do not fit in the session's context (n_ctx); reset it or make a larger one. */
    PEFTRT_ERR_CONTEXT_FULL = -8,
    /* peftrt_session_cancel() stopped the call; the session keeps the tokens evaluated before
       the call (generate: before the token being evaluated) and stays usable. */
    PEFTRT_ERR_CANCELLED = -9,
    /* The session is in use by another call: another thread, or a text callback calling back
       into the session it is called from. */
    PEFTRT_ERR_BUSY = -10,
    /* A bug in peftrt (a caught panic); the message says where. A session that was in use is
       unusable afterwards: free it. */
    PEFTRT_ERR_INTERNAL = -11,
    /* An allocation sized by the request failed: a session's KV cache and buffers for its
       n_ctx (e.g. a config claiming 128K or 2^31 positions, and an n_ctx near that). Nothing
       was created; ask for a smaller n_ctx. (Added after 0.1.0.) */
    PEFTRT_ERR_OUT_OF_MEMORY = -12,
    /* peftrt_session_set_constraint(): the schema, regex or grammar does not compile (invalid,
       or a JSON Schema keyword the compiler does not support); the message names the keyword
       or the position. Sampling: no token can continue the output (an unsatisfiable
       constraint). (Added after 0.1.0.) */
    PEFTRT_ERR_CONSTRAINT_INVALID = -13
} peftrt_status;

/* Why a generation ended. */
typedef enum peftrt_stop_reason {
    PEFTRT_STOP_EOS = 0,          /* the model produced an end-of-sequence token */
    PEFTRT_STOP_MAX_TOKENS = 1,   /* max_tokens were generated */
    PEFTRT_STOP_STRING = 2,       /* the text reached one of the stop strings */
    PEFTRT_STOP_CONTEXT_FULL = 3, /* the session's context is full */
    PEFTRT_STOP_CALLBACK = 4      /* the text callback returned non-zero */
} peftrt_stop_reason;

/* ---------------------------------------------------------------- version and errors */

/* The library's version, "MAJOR.MINOR.PATCH" (compare with PEFTRT_VERSION_STRING to check
   that header and library agree). Static string. Thread-safe. */
const char *peftrt_version(void);

/* The status of the last failed call on this thread (PEFTRT_OK if none failed yet).
   Successful calls leave it unchanged. Thread-safe (thread-local). */
peftrt_status peftrt_last_status(void);

/* A message describing the last failed call on this thread: what was wrong and what to do;
   "" if none failed yet. Valid until the next failing call on this thread. Thread-safe
   (thread-local). */
const char *peftrt_last_error(void);

/* The name of a status code ("PEFTRT_ERR_IO"), or "unknown status". Static string. */
const char *peftrt_status_str(peftrt_status status);

/* ---------------------------------------------------------------- models */

typedef struct peftrt_model_params {
    size_t struct_size;  /* sizeof(peftrt_model_params); set by peftrt_model_default_params() */
    int32_t n_threads;   /* threads of each session of this model whose own n_threads is 0;
                            0 = every core of the machine */
    bool populate;       /* read every page of the memory-mapped weights while loading, so the
                            first request does not wait for the disk; false = pages are read
                            on first use */
    bool no_tokenizer;   /* skip tokenizer.json: token ids only (tokenize, detokenize, chat
                            template and generate then fail); false = load it */
} peftrt_model_params;

/* Defaults: n_threads 0, populate false, no_tokenizer false. Thread-safe. */
peftrt_model_params peftrt_model_default_params(void);

/* Loads a Hugging Face model directory (config.json, *.safetensors, tokenizer.json,
   tokenizer_config.json; F32/F16/BF16 or bitsandbytes NF4 weights), or a GGUF file (llama,
   mistral, qwen2; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K tensors used in
   place, configuration and tokenizer from its metadata). The weights are memory-mapped: the
   files must not be modified while the model is alive. `params` may be
   NULL (defaults). Returns NULL on error: PEFTRT_ERR_IO for a missing path or required file,
   PEFTRT_ERR_FORMAT / PEFTRT_ERR_UNSUPPORTED for its content (see Errors above).
   Thread-safe. */
peftrt_model *peftrt_model_load(const char *path, const peftrt_model_params *params);

/* Releases the caller's handle. Sessions and adapters of the model keep it alive until they
   are freed. NULL is a no-op (PEFTRT_OK); a freed handle is PEFTRT_ERR_INVALID_HANDLE.
   Thread-safe: calls on the model already running on other threads finish on it; calls made
   after the free get PEFTRT_ERR_INVALID_HANDLE. */
peftrt_status peftrt_model_free(peftrt_model *model);

typedef struct peftrt_model_info {
    size_t struct_size;        /* in: sizeof(peftrt_model_info) */
    const char *architecture;  /* "llama", "mistral" or "qwen2"; static string */
    int32_t vocab_size;        /* token ids are 0 .. vocab_size - 1 */
    int32_t n_ctx_train;       /* longest context the model was trained for, in tokens */
    int32_t n_layers;          /* decoder blocks */
    int32_t hidden_size;       /* model width */
    peftrt_token bos_token;    /* beginning-of-sequence token, -1 if none */
    peftrt_token eos_token;    /* first end-of-sequence token, -1 if none */
    bool has_tokenizer;        /* loaded with its tokenizer */
    bool has_chat_template;    /* a chat template is present (peftrt_chat_apply_template) */
} peftrt_model_info;

/* Fills `info` (whose struct_size the caller sets). Thread-safe. */
peftrt_status peftrt_model_get_info(const peftrt_model *model, peftrt_model_info *info);

/* 1 if `token` ends generation (one of the model's EOS ids), 0 if not, or a negative
   peftrt_status. Thread-safe. */
int32_t peftrt_model_is_eos(const peftrt_model *model, peftrt_token token);

/* ---------------------------------------------------------------- text */

/* Tokens of the NUL-terminated UTF-8 `text`; `add_special` adds what the tokenizer adds
   around a sequence (e.g. BOS). Buffer-filling: returns the number of tokens written to
   `tokens` (capacity `n_tokens_max`), or -(number needed) when it is too small. Thread-safe. */
int32_t peftrt_tokenize(const peftrt_model *model, const char *text, bool add_special, peftrt_token *tokens,
                        int32_t n_tokens_max);

/* Text of `tokens` (special tokens kept unless `skip_special`), written NUL-terminated to
   `buf` (capacity `buf_size` bytes). Buffer-filling: returns the text's length in bytes
   without the NUL, or -(length + 1) when `buf_size` is too small. Thread-safe. */
int32_t peftrt_detokenize(const peftrt_model *model, const peftrt_token *tokens, int32_t n_tokens,
                          bool skip_special, char *buf, int32_t buf_size);

typedef struct peftrt_chat_message {
    const char *role;     /* NUL-terminated UTF-8: "system", "user", "assistant", ... */
    const char *content;  /* NUL-terminated UTF-8 */
} peftrt_chat_message;

/* Renders `messages` with the model's own chat template, as transformers'
   apply_chat_template does; `add_generation_prompt` appends the start of the assistant's
   turn. Written NUL-terminated to `buf`. Buffer-filling like peftrt_detokenize.
   PEFTRT_ERR_TOKENIZER if the model has no chat template. Thread-safe. */
int32_t peftrt_chat_apply_template(const peftrt_model *model, const peftrt_chat_message *messages,
                                   size_t n_messages, bool add_generation_prompt, char *buf, int32_t buf_size);

/* ---------------------------------------------------------------- adapters */

typedef struct peftrt_adapter_params {
    size_t struct_size;        /* sizeof(peftrt_adapter_params) */
    bool allow_base_mismatch;  /* load even if the adapter records another base model (its
                                  output will be wrong; experiments only); false = refuse with
                                  PEFTRT_ERR_ADAPTER_MISMATCH. Also overrides strict_base. */
    bool strict_base;          /* refuse (PEFTRT_ERR_ADAPTER_MISMATCH) an adapter that records
                                  no base-model fingerprint and whose adapter_config.json
                                  base_model_name_or_path names another model; false = load it
                                  with a warning on the log. "Names another model": the last
                                  path component of base_model_name_or_path ("SmolLM2-135M" of
                                  "HuggingFaceTB/SmolLM2-135M") equals, ignoring ASCII case,
                                  neither the model directory's name nor the last component of
                                  config.json's _name_or_path. (Added after 0.1.0, where 0.1.0
                                  had padding: the struct's size is unchanged, so initialise it with
                                  peftrt_adapter_default_params() or zero it.) */
} peftrt_adapter_params;

/* Defaults: allow_base_mismatch false, strict_base false. Thread-safe. */
peftrt_adapter_params peftrt_adapter_default_params(void);

/* Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for
   `model`, checking every tensor against it. `params` may be NULL. Returns NULL on error:
   PEFTRT_ERR_IO / PEFTRT_ERR_FORMAT / PEFTRT_ERR_UNSUPPORTED for the files themselves (see
   Errors above), PEFTRT_ERR_ADAPTER_MISMATCH when a well-formed adapter does not fit this
   model (its fingerprint records another base; a module or shape the model does not have;
   with strict_base, it names another model). The adapter keeps the model alive. Thread-safe
   (any number of threads may load adapters for one model). */
peftrt_adapter *peftrt_adapter_load(const peftrt_model *model, const char *path, const peftrt_adapter_params *params);

/* Releases the caller's handle; sessions using the adapter keep it alive until they stop
   using it. NULL is a no-op. Thread-safe like peftrt_model_free(). */
peftrt_status peftrt_adapter_free(peftrt_adapter *adapter);

/* ---------------------------------------------------------------- sessions */

typedef struct peftrt_session_params {
    size_t struct_size;  /* sizeof(peftrt_session_params) */
    int32_t n_ctx;       /* context (KV cache) in tokens; 0 = the model's n_ctx_train, at most 4096 */
    int32_t n_batch;     /* most prompt tokens evaluated per forward pass; 0 = 128 */
    int32_t n_threads;   /* worker threads; 0 = the model params' n_threads */
} peftrt_session_params;

/* Defaults: all 0. Thread-safe. */
peftrt_session_params peftrt_session_default_params(void);

/* A new, empty session over `model`: allocates its KV cache and buffers (nothing is
   allocated per token afterwards) and starts its threads. `params` may be NULL. NULL on
   error: PEFTRT_ERR_INVALID_ARGUMENT for an n_ctx beyond n_ctx_train, PEFTRT_ERR_OUT_OF_MEMORY
   when the cache for n_ctx cannot be allocated (the process is not aborted). Thread-safe. */
peftrt_session *peftrt_session_create(const peftrt_model *model, const peftrt_session_params *params);

/* Frees the session, its cache and threads. NULL is a no-op; PEFTRT_ERR_BUSY while any call
   is using it (another thread's, including peftrt_session_cancel(), or the generation whose
   text callback calls this): nothing is freed then; free it after that call returns. Any
   thread may call it; calls that start after a successful free get
   PEFTRT_ERR_INVALID_HANDLE. */
peftrt_status peftrt_session_free(peftrt_session *session);

/* Forgets the conversation (cached tokens); adapters, sampler and constraint are kept (the
   constraint starts over). One thread. */
peftrt_status peftrt_session_reset(peftrt_session *session);

/* Makes `adapters[0..n)` the active set, `scales[i]` the scale of adapters[i] (1 = as
   trained, 0 = off; finite). `scales` NULL = all 1. n = 0 deactivates all (adapters may be
   NULL then). Each adapter must be loaded for this session's model handle, else
   PEFTRT_ERR_ADAPTER_MISMATCH. The cache is kept: reset to re-read a prompt with the new set.
   Switching costs microseconds (no weights are copied). One thread. */
peftrt_status peftrt_session_set_adapters(peftrt_session *session, peftrt_adapter *const *adapters,
                                          const float *scales, size_t n);

/* Evaluates `tokens` after the cached ones (a prompt, or one sampled token). Afterwards
   peftrt_session_logits() gives the last token's logits. PEFTRT_ERR_CONTEXT_FULL when they
   do not fit, PEFTRT_ERR_CANCELLED if cancelled (the cache is then as before the call).
   One thread; peftrt_session_cancel() from any thread. */
peftrt_status peftrt_session_eval(peftrt_session *session, const peftrt_token *tokens, int32_t n_tokens);

/* The logits of the last evaluated token, `*n_vocab` (if not NULL) floats. Valid until the
   next call that evaluates, resets or frees the session. NULL on error (nothing evaluated
   yet, or the last evaluation was cancelled). One thread. */
const float *peftrt_session_logits(peftrt_session *session, int32_t *n_vocab);

/* The tokens in the session's cache. Buffer-filling. One thread. */
int32_t peftrt_session_tokens(peftrt_session *session, peftrt_token *tokens, int32_t n_tokens_max);

typedef struct peftrt_sampling_params {
    size_t struct_size;        /* sizeof(peftrt_sampling_params) */
    float temperature;         /* softmax temperature; 0 = greedy (the most likely token) */
    int32_t top_k;             /* keep the k most likely tokens; 0 = off */
    float top_p;               /* keep the fewest tokens whose probabilities add up to top_p;
                                  1 = off; must be in (0, 1] */
    float min_p;               /* drop tokens less likely than min_p x the most likely; 0 = off */
    float repetition_penalty;  /* divide positive (multiply negative) logits of tokens seen
                                  in the last repeat_last_n tokens; 1 = off */
    int32_t repeat_last_n;     /* tokens the repetition penalty looks back; 0 = all */
    uint64_t seed;             /* random seed: the same seed gives the same tokens */
    int32_t max_tokens;        /* most tokens to generate; 0 = until EOS or a full context */
    const char *const *stop;   /* n_stop NUL-terminated UTF-8 stop strings: generation ends
                                  when the text contains one (not passed to the callback);
                                  copied, need not outlive the call; NULL if n_stop is 0 */
    size_t n_stop;
    bool ignore_eos;           /* keep generating past end-of-sequence tokens; false = stop */
} peftrt_sampling_params;

/* Defaults: greedy (temperature 0, top_k 0, top_p 1, min_p 0, repetition_penalty 1,
   repeat_last_n 64, seed 0), max_tokens 256, no stop strings, ignore_eos false. Thread-safe. */
peftrt_sampling_params peftrt_sampling_default_params(void);

/* Sets the session's sampler used by peftrt_session_sample() (seeding its random generator
   anew). A new session samples greedily. One thread. */
peftrt_status peftrt_session_set_sampling(peftrt_session *session, const peftrt_sampling_params *params);

/* Picks the next token from the last logits with the session's sampler (the repetition
   penalty looks at the cached tokens). Does not evaluate it: pass it to
   peftrt_session_eval(). With a constraint (peftrt_session_set_constraint), only tokens that
   can continue it are picked and the constraint advances by the token: sample once per
   evaluated token. Once the constraint's grammar has ended, the token is the model's EOS.
   One thread. */
peftrt_status peftrt_session_sample(peftrt_session *session, peftrt_token *token);

/* What a constraint's text is. */
typedef enum peftrt_constraint_kind {
    PEFTRT_CONSTRAINT_NONE = -1,       /* no constraint (peftrt_request only) */
    PEFTRT_CONSTRAINT_JSON_SCHEMA = 0, /* a JSON Schema (draft 2020-12 keywords as llguidance
                                          supports them); the output is JSON valid under it */
    PEFTRT_CONSTRAINT_JSON_OBJECT = 1, /* any JSON object; the text is ignored (may be NULL) */
    PEFTRT_CONSTRAINT_REGEX = 2,       /* a regular expression the whole output matches */
    PEFTRT_CONSTRAINT_LARK = 3         /* a Lark grammar (llguidance's dialect, `start` rule) */
} peftrt_constraint_kind;

/* Constrains the session's output to `text` (`len` bytes of UTF-8, not necessarily
   NUL-terminated; at most 64 MiB) of the given kind, compiled with llguidance against the
   model's vocabulary (the first constraint on a model also builds its token trie, once).
   From then on, peftrt_session_sample() and peftrt_session_generate() mask the tokens that
   cannot continue the output before sampling (temperature, top-k, top-p and min-p act on the
   allowed tokens), allow EOS only where the grammar may end, and stop when it is complete:
   PEFTRT_STOP_EOS then means the output is complete and valid. An output cut by max_tokens
   or the context says so (PEFTRT_STOP_MAX_TOKENS, PEFTRT_STOP_CONTEXT_FULL) and is not
   complete. Greedy decoding where the model already follows the grammar gives the same
   tokens as without the constraint.
   Each peftrt_session_generate() starts the constraint over; peftrt_session_sample() advances
   it from where it stands (set again, or peftrt_session_reset(), to start over;
   peftrt_session_set_sampling() keeps it where it stands). Stays until replaced or
   peftrt_session_clear_constraint(). PEFTRT_ERR_CONSTRAINT_INVALID if it does not compile
   (the previous constraint, if any, is kept), with the compiler's message in
   peftrt_last_error(); PEFTRT_ERR_INVALID_ARGUMENT for an unknown kind, NULL text with
   len > 0, or text that is not UTF-8. One thread. */
peftrt_status peftrt_session_set_constraint(peftrt_session *session, peftrt_constraint_kind kind,
                                            const char *text, size_t len);

/* Lifts the session's constraint: sampling and generation are free again. One thread. */
peftrt_status peftrt_session_clear_constraint(peftrt_session *session);

/* Receives generated text: `len` bytes of UTF-8 at `text` (also NUL-terminated; never a
   partial character, never text that may start a stop string). Return 0 to continue,
   non-zero to stop generation (PEFTRT_STOP_CALLBACK). Must not throw or longjmp.
   All the pieces together equal peftrt_detokenize() of the generated tokens (skip_special
   false, without a final EOS token), cut before a stop string: when generation ends inside a
   character that a byte-level token split, the last piece ends with U+FFFD (the replacement
   character, as peftrt_detokenize() gives it) instead of dropping those bytes. */
typedef int (*peftrt_text_callback)(const char *text, size_t len, void *user_data);

typedef struct peftrt_generation {
    size_t struct_size;      /* in: sizeof(peftrt_generation) */
    peftrt_token *tokens;    /* in: where to write the generated tokens, or NULL */
    int32_t n_tokens_max;    /* in: capacity of `tokens` */
    int32_t n_tokens;        /* out: tokens generated, including a final EOS; if more than
                                n_tokens_max, only the first n_tokens_max were written */
    int32_t n_prompt_tokens; /* out: tokens of the prompt evaluated first */
    peftrt_stop_reason stop; /* out: why it ended */
    double prefill_ms;       /* out: time evaluating the prompt, milliseconds */
    double decode_ms;        /* out: time generating, milliseconds */
} peftrt_generation;

/* Evaluates `prompt` (n_prompt >= 1 tokens) after the cached ones, then samples and
   evaluates tokens with `params` (NULL = defaults; a sampler of its own, seeded from
   params->seed), passing text to `on_text` (may be NULL) as it completes. Fills `result`
   (may be NULL). A callback that stops generation is not an error (PEFTRT_OK, stop =
   PEFTRT_STOP_CALLBACK). PEFTRT_ERR_CANCELLED if peftrt_session_cancel() stopped it
   (`result` is then not filled; the text so far was passed to the callback).
   PEFTRT_ERR_CONTEXT_FULL if the prompt does not fit after the cached tokens.
   Afterwards the session's tokens (peftrt_session_tokens) are the cached ones, the prompt and
   the generated tokens but the last: n_tokens - 1 of them, since the last sampled token is
   returned, not evaluated. To continue the conversation without a reset, pass that token
   first in the next prompt (or peftrt_session_eval() it); until then
   peftrt_session_logits() gives the logits that last token was sampled from.
   One thread; peftrt_session_cancel() from any thread. */
peftrt_status peftrt_session_generate(peftrt_session *session, const peftrt_token *prompt, int32_t n_prompt,
                                      const peftrt_sampling_params *params, peftrt_text_callback on_text,
                                      void *user_data, peftrt_generation *result);

/* Asks the peftrt_session_eval() or peftrt_session_generate() running on `session` to stop:
   it returns PEFTRT_ERR_CANCELLED at the next layer boundary (within one layer's time, also
   during a long prompt). Each eval/generate call clears the request when it starts, so a
   cancel with nothing running has no effect. Thread-safe: any thread, at any time while the
   session is alive. */
peftrt_status peftrt_session_cancel(peftrt_session *session);

/* ---------------------------------------------------------------- engine (many requests at once) */

/* An engine serves up to max_sequences requests at once on one model: each step is one
   forward pass over all of them (each decoding request's next token, and pieces of joining
   prompts), so the weights are read once for all; each request keeps its own adapters and
   scales, sampling parameters, constraint and callbacks. Requests join (peftrt_engine_submit)
   and leave (finished, cancelled) between any two steps.
   A request's tokens and text are the same as peftrt_session_generate() gives in a session
   with the same n_batch (peftrt_session_params), adapters, scales and sampling parameters,
   whatever else runs beside it.
   Prefix reuse: a request whose prompt starts with the same tokens as an earlier request's
   (with the same adapters and scales) keeps the keys and values of the whole n_batch batches
   they share, kept by the earlier request's slot once it is free, instead of evaluating them.
   Threads: an engine is used by one thread at a time (another call gets PEFTRT_ERR_BUSY;
   callbacks run on the thread that steps, inside the step, and may not call into the engine
   except peftrt_engine_cancel()). peftrt_engine_cancel() may be called from any thread at any
   time. The engine keeps its model and the adapters of its requests alive. (Added after
   0.1.0.) */

typedef struct peftrt_engine_params {
    size_t struct_size;     /* sizeof(peftrt_engine_params) */
    int32_t max_sequences;  /* most requests in progress at once; 0 = 8 */
    int32_t n_ctx;          /* context of each request in tokens (prompt and reply); 0 = the
                               model's n_ctx_train, at most 2048. The KV caches of all
                               max_sequences are allocated up front (zeroed pages, paid for as
                               they are used). */
    int32_t n_batch;        /* the session n_batch whose results the engine reproduces; 0 = 128 */
    int32_t step_tokens;    /* most prompt tokens evaluated per step over all joining requests
                               (a long prompt is split over steps, so the others' streams go
                               on); 0 = n_batch */
    int32_t n_threads;      /* worker threads; 0 = the model params' n_threads */
} peftrt_engine_params;

/* Defaults: all 0. Thread-safe. */
peftrt_engine_params peftrt_engine_default_params(void);

/* A new engine over `model`, its caches and buffers allocated (a step allocates nothing).
   `params` may be NULL. NULL on error: PEFTRT_ERR_INVALID_ARGUMENT (an n_ctx beyond
   n_ctx_train), PEFTRT_ERR_OUT_OF_MEMORY (caches that cannot be allocated). Thread-safe. */
peftrt_engine *peftrt_engine_create(const peftrt_model *model, const peftrt_engine_params *params);

/* Frees the engine; requests still in progress end without their done callback. NULL is a
   no-op; PEFTRT_ERR_BUSY while another call is using it. Any thread. */
peftrt_status peftrt_engine_free(peftrt_engine *engine);

/* What a request ended with, passed to its done callback. Valid during the callback. */
typedef struct peftrt_request_result {
    size_t struct_size;          /* sizeof(peftrt_request_result) */
    uint64_t request;            /* the id peftrt_engine_submit() gave */
    peftrt_status status;        /* PEFTRT_OK, or the error that ended the request (e.g.
                                    PEFTRT_ERR_FORMAT for non-finite logits); message in error */
    peftrt_stop_reason stop;     /* why it ended (when status is PEFTRT_OK); cancelled by
                                    peftrt_engine_cancel() or by a text callback returning
                                    non-zero: PEFTRT_STOP_CALLBACK */
    const peftrt_token *tokens;  /* the generated tokens (a final EOS included) */
    int32_t n_tokens;
    int32_t n_prompt_tokens;
    double first_token_ms;       /* from submit to the first token (queueing and prefill) */
    double decode_ms;            /* from the first token to the end */
    const char *error;           /* "" when status is PEFTRT_OK */
} peftrt_request_result;

/* Called once when a request ends (finished, cancelled or failed), from inside a step. */
typedef void (*peftrt_request_done_callback)(const peftrt_request_result *result, void *user_data);

typedef struct peftrt_request {
    size_t struct_size;                /* sizeof(peftrt_request) */
    const peftrt_token *prompt;        /* the prompt as n_prompt >= 1 tokens, or NULL and ... */
    int32_t n_prompt;
    const peftrt_chat_message *messages; /* ... chat messages, rendered with the model's chat
                                          template and the assistant turn's start; one of the
                                          two, not both */
    size_t n_messages;
    peftrt_adapter *const *adapters;   /* n_adapters adapters loaded for this model (0 = the
                                          base alone), each with scales[i] (NULL = all 1) */
    const float *scales;
    size_t n_adapters;
    const peftrt_sampling_params *sampling; /* NULL = defaults (greedy, max_tokens 256) */
    int32_t constraint_kind;           /* a peftrt_constraint_kind; PEFTRT_CONSTRAINT_NONE = none */
    const char *constraint;            /* its text, constraint_len bytes of UTF-8 */
    size_t constraint_len;
    peftrt_text_callback on_text;      /* the reply's text as it completes (may be NULL);
                                          non-zero ends this request (PEFTRT_STOP_CALLBACK) */
    peftrt_request_done_callback on_done; /* may be NULL */
    void *user_data;                   /* passed to both callbacks */
} peftrt_request;

/* Defaults: no prompt, no adapters, default sampling, no constraint, no callbacks.
   Thread-safe. */
peftrt_request peftrt_request_default(void);

/* Starts a request; it joins at the next step. Everything it points to is copied: it need
   not outlive the call (user_data excepted). Writes its id to `request_out` (may be NULL).
   Errors, with nothing started: PEFTRT_ERR_INVALID_ARGUMENT (every slot busy: "too many
   sequences"; an empty prompt, a token out of range, bad sampling parameters, both or
   neither of prompt and messages), PEFTRT_ERR_CONTEXT_FULL (a prompt longer than n_ctx),
   PEFTRT_ERR_ADAPTER_MISMATCH (an adapter loaded for another model handle),
   PEFTRT_ERR_CONSTRAINT_INVALID, PEFTRT_ERR_TOKENIZER (messages without a chat template).
   One thread. */
peftrt_status peftrt_engine_submit(peftrt_engine *engine, const peftrt_request *request, uint64_t *request_out);

/* One step: every request in progress advances (text and done callbacks are called from
   here). Writes the number of requests still in progress to `active_out` (may be NULL).
   A request's own error ends that request only (its done callback gets the status).
   One thread. */
peftrt_status peftrt_engine_step(peftrt_engine *engine, int32_t *active_out);

/* Steps until no request is in progress. One thread. */
peftrt_status peftrt_engine_run(peftrt_engine *engine);

/* Ends `request` at the next step (its done callback then gets PEFTRT_STOP_CALLBACK).
   PEFTRT_ERR_INVALID_ARGUMENT if it is not in progress (already done, or never submitted).
   Thread-safe: any thread, also from a callback. */
peftrt_status peftrt_engine_cancel(peftrt_engine *engine, uint64_t request);

#ifdef __cplusplus
}
#endif

#endif /* PEFTRT_H */
