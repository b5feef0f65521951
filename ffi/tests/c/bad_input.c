/*
 * The C API under bad input (issue #5): NULL everywhere a pointer is taken, a missing model
 * path, an adapter for another base model, too-small buffers, out-of-range token ids,
 * invalid UTF-8, freed handles, a callback that stops early, cancel during generation, a
 * session used from two threads. Each must return its documented error and leave the
 * process healthy: the suite ends with a normal generation that must equal a fresh one.
 * Run under valgrind by `make test-ffi`.
 *
 * Hostile files (issue #18, test_hostile_*): model and adapter directories written into a
 * temporary directory with one thing wrong each (a missing file, a truncated or lying
 * safetensors header, NaN or out-of-range config values, an EOS id outside the vocabulary, a
 * FIFO as config.json, non-float adapter tensors, another base model, a context too large to
 * allocate). Each load returns NULL with the status of the header's rule and a message
 * naming the file, key or tensor; none crashes or hangs.
 *
 *   bad_input MODEL_DIR ADAPTER_DIR OTHER_MODEL_DIR
 *
 * ADAPTER_DIR is an adapter for MODEL_DIR; OTHER_MODEL_DIR a base model of other shapes.
 */
#define _GNU_SOURCE /* mkdtemp, realpath, symlink, mkfifo, pthread_timedjoin_np */
#include <peftrt.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        checks++;                                                                                                      \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            fprintf(stderr, "%s:%d: FAILED: %s (last error: %s)\n", __FILE__, __LINE__, #cond, peftrt_last_error());  \
        }                                                                                                              \
    } while (0)

/* `call` returns status `want`, and the thread's last status says the same. */
#define EXPECT_STATUS(call, want)                                                                                      \
    do {                                                                                                               \
        peftrt_status got_ = (call);                                                                                   \
        CHECK(got_ == (want));                                                                                         \
        if (got_ != PEFTRT_OK) CHECK(peftrt_last_status() == got_ && peftrt_last_error()[0] != 0);                    \
    } while (0)

/* A constructor returns NULL with last status `want`. */
#define EXPECT_NULL(call, want)                                                                                        \
    do {                                                                                                               \
        CHECK((call) == NULL);                                                                                         \
        CHECK(peftrt_last_status() == (want));                                                                         \
    } while (0)

/* A buffer-filling function fails (not a short buffer) with last status `want`. */
#define EXPECT_BUFFER_ERROR(call, want)                                                                                \
    do {                                                                                                               \
        CHECK((call) == PEFTRT_BUFFER_ERROR);                                                                          \
        CHECK(peftrt_last_status() == (want));                                                                         \
    } while (0)

static const char *model_dir, *adapter_dir, *other_model_dir;

static peftrt_session *small_session(peftrt_model *m, int n_ctx) {
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = n_ctx;
    p.n_threads = 1;
    return peftrt_session_create(m, &p);
}

static void test_version_and_layouts(void) {
    CHECK(strcmp(peftrt_version(), PEFTRT_VERSION_STRING) == 0);
    CHECK(peftrt_model_default_params().struct_size == sizeof(peftrt_model_params));
    CHECK(peftrt_adapter_default_params().struct_size == sizeof(peftrt_adapter_params));
    CHECK(peftrt_session_default_params().struct_size == sizeof(peftrt_session_params));
    CHECK(peftrt_sampling_default_params().struct_size == sizeof(peftrt_sampling_params));
    CHECK(strcmp(peftrt_status_str(PEFTRT_ERR_CANCELLED), "PEFTRT_ERR_CANCELLED") == 0);
    CHECK(strcmp(peftrt_status_str((peftrt_status)12345), "unknown status") == 0);
}

static void test_nulls(peftrt_model *m, peftrt_session *s) {
    peftrt_token t[4] = {1, 2, 3, 4};
    char buf[64];
    peftrt_model_info info = {.struct_size = sizeof info};
    peftrt_generation g = {.struct_size = sizeof g};

    EXPECT_NULL(peftrt_model_load(NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_model_free(NULL), PEFTRT_OK);
    EXPECT_STATUS(peftrt_model_get_info(NULL, &info), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_model_get_info(m, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(peftrt_model_is_eos(NULL, 0) == PEFTRT_ERR_INVALID_ARGUMENT);

    EXPECT_BUFFER_ERROR(peftrt_tokenize(NULL, "x", true, t, 4), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_tokenize(m, NULL, true, t, 4), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_tokenize(m, "hello", false, NULL, 4), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_detokenize(NULL, t, 1, false, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_detokenize(m, NULL, 1, false, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_detokenize(m, t, 1, false, NULL, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_chat_message no_role = {.role = NULL, .content = "hi"};
    peftrt_chat_message no_content = {.role = "user", .content = NULL};
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(NULL, &no_content, 1, true, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(m, NULL, 1, true, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(m, &no_role, 1, true, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(m, &no_content, 1, true, buf, 64), PEFTRT_ERR_INVALID_ARGUMENT);

    EXPECT_NULL(peftrt_adapter_load(NULL, adapter_dir, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_NULL(peftrt_adapter_load(m, NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_adapter_free(NULL), PEFTRT_OK);

    EXPECT_NULL(peftrt_session_create(NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_free(NULL), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_reset(NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_set_adapters(NULL, NULL, NULL, 0), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_set_adapters(s, NULL, NULL, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_adapter *null_adapter = NULL;
    EXPECT_STATUS(peftrt_session_set_adapters(s, &null_adapter, NULL, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_eval(NULL, t, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_eval(s, NULL, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(peftrt_session_logits(NULL, NULL) == NULL);
    EXPECT_BUFFER_ERROR(peftrt_session_tokens(NULL, t, 4), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_set_sampling(NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_sample(NULL, t), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_sample(s, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_generate(NULL, t, 1, NULL, NULL, NULL, &g), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_generate(s, NULL, 1, NULL, NULL, NULL, &g), PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_generation no_tokens = {.struct_size = sizeof no_tokens, .tokens = NULL, .n_tokens_max = 4};
    EXPECT_STATUS(peftrt_session_generate(s, t, 1, NULL, NULL, NULL, &no_tokens), PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_sampling_params null_stop = peftrt_sampling_default_params();
    null_stop.n_stop = 1; /* but stop is NULL */
    EXPECT_STATUS(peftrt_session_generate(s, t, 1, &null_stop, NULL, NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_cancel(NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    /* None of these touched the session: it holds nothing. */
    CHECK(peftrt_session_tokens(s, NULL, 0) == 0);
}

static void test_files(peftrt_model *m) {
    EXPECT_NULL(peftrt_model_load("does/not/exist", NULL), PEFTRT_ERR_IO);
    CHECK(strstr(peftrt_last_error(), "does/not/exist") != NULL);
    EXPECT_NULL(peftrt_model_load("", NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_NULL(peftrt_model_load(adapter_dir, NULL), PEFTRT_ERR_IO); /* an adapter has no config.json */
    CHECK(strstr(peftrt_last_error(), "config.json") != NULL);
    EXPECT_NULL(peftrt_adapter_load(m, "does/not/exist", NULL), PEFTRT_ERR_IO);
    EXPECT_NULL(peftrt_adapter_load(m, model_dir, NULL), PEFTRT_ERR_IO); /* a model has no adapter_config.json */
    /* An adapter trained for another base model (other shapes). */
    peftrt_model *other = peftrt_model_load(other_model_dir, NULL);
    CHECK(other != NULL);
    EXPECT_NULL(peftrt_adapter_load(other, adapter_dir, NULL), PEFTRT_ERR_ADAPTER_MISMATCH);
    CHECK(strstr(peftrt_last_error(), "does not match this base model") != NULL);
    EXPECT_STATUS(peftrt_model_free(other), PEFTRT_OK);
    /* A params struct this library does not know. */
    peftrt_model_params mp = peftrt_model_default_params();
    mp.struct_size = 3;
    EXPECT_NULL(peftrt_model_load(model_dir, &mp), PEFTRT_ERR_INVALID_ARGUMENT);
    mp = peftrt_model_default_params();
    mp.n_threads = -1;
    EXPECT_NULL(peftrt_model_load(model_dir, &mp), PEFTRT_ERR_INVALID_ARGUMENT);
    /* Without its tokenizer a model still evaluates ids, but text functions say why they fail. */
    mp = peftrt_model_default_params();
    mp.no_tokenizer = true;
    mp.populate = true;
    peftrt_model *ids_only = peftrt_model_load(model_dir, &mp);
    CHECK(ids_only != NULL);
    peftrt_token t[4];
    EXPECT_BUFFER_ERROR(peftrt_tokenize(ids_only, "hi", true, t, 4), PEFTRT_ERR_TOKENIZER);
    peftrt_chat_message msg = {"user", "hi"};
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(ids_only, &msg, 1, true, NULL, 0), PEFTRT_ERR_TOKENIZER);
    peftrt_model_info info = {.struct_size = sizeof info};
    EXPECT_STATUS(peftrt_model_get_info(ids_only, &info), PEFTRT_OK);
    CHECK(!info.has_tokenizer && !info.has_chat_template && info.vocab_size > 0);
    EXPECT_STATUS(peftrt_model_free(ids_only), PEFTRT_OK);
}

/* Constraints (issue 20): every bad argument is a status with a message; a schema that does
   not compile is CONSTRAINT_INVALID naming the keyword or position, and keeps the constraint
   that was set; a constraint then holds for sample (EOS once the grammar has ended). */
/* The engine (issue 21): bad requests are refused with nothing started and the others go on;
   a cancelled request and one whose callback says stop end alone; cancel from a callback;
   unknown ids; a full engine. */
typedef struct {
    int done, stop_after, texts;
    peftrt_status status;
    peftrt_stop_reason stop;
    peftrt_engine *engine;
    uint64_t cancel_other;
} engine_req;

static int engine_text(const char *text, size_t len, void *user_data) {
    engine_req *r = user_data;
    (void)text;
    (void)len;
    r->texts++;
    if (r->cancel_other) {
        /* Cancelling another request from inside a step is allowed. */
        CHECK(peftrt_engine_cancel(r->engine, r->cancel_other) == PEFTRT_OK);
        r->cancel_other = 0;
    }
    /* Calling back into the engine otherwise is refused, not a deadlock. */
    CHECK(peftrt_engine_step(r->engine, NULL) == PEFTRT_ERR_BUSY);
    CHECK(peftrt_engine_free(r->engine) == PEFTRT_ERR_BUSY);
    return r->stop_after && r->texts >= r->stop_after;
}

static void engine_done(const peftrt_request_result *res, void *user_data) {
    engine_req *r = user_data;
    CHECK(res->struct_size == sizeof *res && res->error != NULL);
    r->done++;
    r->status = res->status;
    r->stop = res->stop;
}

static void test_engine(peftrt_model *m) {
    peftrt_engine_params ep = peftrt_engine_default_params();
    CHECK(ep.struct_size == sizeof ep);
    CHECK(peftrt_request_default().struct_size == sizeof(peftrt_request));
    EXPECT_NULL(peftrt_engine_create(NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    ep.n_ctx = 1 << 30;
    EXPECT_NULL(peftrt_engine_create(m, &ep), PEFTRT_ERR_INVALID_ARGUMENT);
    ep.n_ctx = -1;
    EXPECT_NULL(peftrt_engine_create(m, &ep), PEFTRT_ERR_INVALID_ARGUMENT);
    ep = peftrt_engine_default_params();
    ep.max_sequences = 2;
    ep.n_ctx = 48;
    peftrt_engine *e = peftrt_engine_create(m, &ep);
    CHECK(e != NULL);
    if (!e) return;

    peftrt_token prompt[8];
    int32_t n = peftrt_tokenize(m, "hello there", true, prompt, 8);
    CHECK(n > 0);
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = 6;
    sp.ignore_eos = true;
    engine_req a = {.engine = e}, b = {.engine = e, .stop_after = 1}, c = {.engine = e};
    peftrt_request q = peftrt_request_default();
    q.sampling = &sp;
    q.on_text = engine_text;
    q.on_done = engine_done;

    /* Refused, nothing started. */
    EXPECT_STATUS(peftrt_engine_submit(NULL, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_engine_submit(e, NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT); /* no prompt */
    peftrt_chat_message msg = {.role = "user", .content = "hi"};
    q.prompt = prompt;
    q.n_prompt = n;
    q.messages = &msg;
    q.n_messages = 1;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT); /* both */
    q.messages = NULL;
    q.n_messages = 0;
    peftrt_token bad = 1 << 20;
    q.prompt = &bad;
    q.n_prompt = 1;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_token long_prompt[64] = {0};
    for (int i = 0; i < 64; i++) long_prompt[i] = prompt[0];
    q.prompt = long_prompt;
    q.n_prompt = 64;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_CONTEXT_FULL);
    q.prompt = prompt;
    q.n_prompt = n;
    q.constraint_kind = PEFTRT_CONSTRAINT_REGEX;
    q.constraint = "(ab";
    q.constraint_len = 3;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_CONSTRAINT_INVALID);
    q.constraint_kind = PEFTRT_CONSTRAINT_NONE;
    peftrt_adapter *freed = (peftrt_adapter *)e; /* an engine is not an adapter */
    q.adapters = &freed;
    q.n_adapters = 1;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_HANDLE);
    q.adapters = NULL;
    q.n_adapters = 0;
    peftrt_sampling_params bad_sp = sp;
    bad_sp.top_p = 0;
    q.sampling = &bad_sp;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    q.sampling = &sp;
    EXPECT_STATUS(peftrt_engine_cancel(e, 999), PEFTRT_ERR_INVALID_ARGUMENT);
    int32_t active = -1;
    EXPECT_STATUS(peftrt_engine_step(e, &active), PEFTRT_OK);
    CHECK(active == 0);

    /* Two requests fill the engine; a third is refused; b's callback stops it after one piece
       of text, a's callback cancels c, which is submitted once b has made room. */
    uint64_t ida = 0, idb = 0, idc = 0;
    q.user_data = &a;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, &ida), PEFTRT_OK);
    q.user_data = &b;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, &idb), PEFTRT_OK);
    CHECK(ida != 0 && idb != 0 && ida != idb);
    q.user_data = &c;
    EXPECT_STATUS(peftrt_engine_submit(e, &q, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(peftrt_last_error(), "too many sequences") != NULL);
    while (!b.done) EXPECT_STATUS(peftrt_engine_step(e, &active), PEFTRT_OK);
    CHECK(b.status == PEFTRT_OK && b.stop == PEFTRT_STOP_CALLBACK);
    EXPECT_STATUS(peftrt_engine_submit(e, &q, &idc), PEFTRT_OK);
    a.cancel_other = idc;
    EXPECT_STATUS(peftrt_engine_run(e), PEFTRT_OK);
    CHECK(a.done == 1 && a.status == PEFTRT_OK && a.stop == PEFTRT_STOP_MAX_TOKENS);
    CHECK(c.done == 1 && c.stop == PEFTRT_STOP_CALLBACK);
    EXPECT_STATUS(peftrt_engine_cancel(e, ida), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_engine_free(e), PEFTRT_OK);
    EXPECT_STATUS(peftrt_engine_step(e, NULL), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_engine_free(NULL), PEFTRT_OK);
}

static void test_constraints(peftrt_model *m) {
    peftrt_session *s = small_session(m, 64);
    const char *digits = "[0-9]{2}";
    EXPECT_STATUS(peftrt_session_set_constraint(NULL, PEFTRT_CONSTRAINT_REGEX, digits, strlen(digits)),
                  PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_clear_constraint(NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_REGEX, NULL, 4), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_set_constraint(s, (peftrt_constraint_kind)7, digits, strlen(digits)),
                  PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(peftrt_last_error(), "PEFTRT_CONSTRAINT_") != NULL);
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_REGEX, "\xff\xfe", 2), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(peftrt_last_error(), "UTF-8") != NULL);
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_REGEX, "(ab", 3), PEFTRT_ERR_CONSTRAINT_INVALID);
    const char *not_json = "{\"type\": ";
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_JSON_SCHEMA, not_json, strlen(not_json)),
                  PEFTRT_ERR_CONSTRAINT_INVALID);
    const char *unsupported = "{\"type\": \"object\", \"if\": {}, \"then\": {}}";
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_JSON_SCHEMA, unsupported, strlen(unsupported)),
                  PEFTRT_ERR_CONSTRAINT_INVALID);
    CHECK(strstr(peftrt_last_error(), "if") != NULL);
    const char *undefined = "start: missing_rule";
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_LARK, undefined, strlen(undefined)),
                  PEFTRT_ERR_CONSTRAINT_INVALID);
    CHECK(strstr(peftrt_last_error(), "missing_rule") != NULL);
    /* The text need not be NUL-terminated: only len bytes are read ("[0-9]{2}" of a longer buffer). */
    const char longer[] = "[0-9]{2}XXXX";
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_REGEX, longer, 8), PEFTRT_OK);
    /* A bad one after a good one keeps the good one. */
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_REGEX, "(", 1), PEFTRT_ERR_CONSTRAINT_INVALID);
    peftrt_token prompt[4];
    int32_t n = peftrt_tokenize(m, "hello", true, prompt, 4);
    CHECK(n > 0);
    peftrt_token out[8];
    peftrt_generation g = {.struct_size = sizeof g, .tokens = out, .n_tokens_max = 8};
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = 8;
    EXPECT_STATUS(peftrt_session_generate(s, prompt, n, &sp, NULL, NULL, &g), PEFTRT_OK);
    char text[64];
    int32_t n_text = g.n_tokens;
    if (n_text > 0 && peftrt_model_is_eos(m, out[n_text - 1]) == 1) n_text--;
    CHECK(g.stop == PEFTRT_STOP_EOS && peftrt_detokenize(m, out, n_text, false, text, sizeof text) == 2);
    CHECK(text[0] >= '0' && text[0] <= '9' && text[1] >= '0' && text[1] <= '9');
    /* Token by token, the same constraint: two digits, then only EOS. */
    EXPECT_STATUS(peftrt_session_reset(s), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_eval(s, prompt, n), PEFTRT_OK);
    int eos = 0;
    for (int i = 0; i < 6; i++) {
        peftrt_token t;
        EXPECT_STATUS(peftrt_session_sample(s, &t), PEFTRT_OK);
        if (peftrt_model_is_eos(m, t) == 1) {
            eos++;
        } else {
            CHECK(eos == 0);
            EXPECT_STATUS(peftrt_session_eval(s, &t, 1), PEFTRT_OK);
        }
    }
    CHECK(eos >= 3);
    EXPECT_STATUS(peftrt_session_clear_constraint(s), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_set_constraint(s, PEFTRT_CONSTRAINT_JSON_OBJECT, NULL, 0), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
}

static void test_buffers_and_ranges(peftrt_model *m, peftrt_session *s) {
    peftrt_model_info info = {.struct_size = sizeof info};
    EXPECT_STATUS(peftrt_model_get_info(m, &info), PEFTRT_OK);
    peftrt_token t[64];
    /* Too-small token buffer: minus the size needed, nothing written. */
    int32_t need = -peftrt_tokenize(m, "hello world, hello again", false, NULL, 0);
    CHECK(need > 1);
    t[0] = -77;
    CHECK(peftrt_tokenize(m, "hello world, hello again", false, t, need - 1) == -need);
    CHECK(t[0] == -77);
    CHECK(peftrt_tokenize(m, "hello world, hello again", false, t, need) == need);
    CHECK(peftrt_tokenize(m, "", false, t, 0) == 0);
    EXPECT_BUFFER_ERROR(peftrt_tokenize(m, "hi", false, t, -1), PEFTRT_ERR_INVALID_ARGUMENT);
    /* Too-small text buffers: minus (length + 1). */
    char buf[256];
    int32_t len = peftrt_detokenize(m, t, need, false, buf, sizeof buf);
    CHECK(len > 0 && (size_t)len == strlen(buf));
    CHECK(peftrt_detokenize(m, t, need, false, buf, len) == -(len + 1));
    CHECK(peftrt_detokenize(m, t, need, false, NULL, 0) == -(len + 1));
    peftrt_chat_message msg = {"user", "hello"};
    int32_t chat = peftrt_chat_apply_template(m, &msg, 1, true, buf, sizeof buf);
    CHECK(chat > 0 && strstr(buf, "hello") != NULL);
    CHECK(peftrt_chat_apply_template(m, &msg, 1, true, buf, 4) == -(chat + 1));
    /* Invalid UTF-8. */
    EXPECT_BUFFER_ERROR(peftrt_tokenize(m, "ok \xff\xfe", false, t, 64), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(peftrt_last_error(), "UTF-8") != NULL);
    peftrt_chat_message bad = {"user", "\xc3\x28"};
    EXPECT_BUFFER_ERROR(peftrt_chat_apply_template(m, &bad, 1, true, buf, sizeof buf), PEFTRT_ERR_INVALID_ARGUMENT);
    /* Out-of-range token ids. */
    peftrt_token out_of_range[2] = {1, info.vocab_size};
    peftrt_token negative[1] = {-1};
    EXPECT_STATUS(peftrt_session_eval(s, out_of_range, 2), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_eval(s, negative, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_STATUS(peftrt_session_eval(s, t, 0), PEFTRT_ERR_INVALID_ARGUMENT);
    EXPECT_BUFFER_ERROR(peftrt_detokenize(m, out_of_range, 2, false, buf, sizeof buf), PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(peftrt_model_is_eos(m, info.vocab_size) == PEFTRT_ERR_INVALID_ARGUMENT);
    CHECK(peftrt_model_is_eos(m, info.eos_token) == 1);
    CHECK(peftrt_model_is_eos(m, 5) == 0 || info.eos_token == 5);
    CHECK(peftrt_session_tokens(s, NULL, 0) == 0); /* nothing was evaluated */
    /* Logits and sampling before any evaluation. */
    CHECK(peftrt_session_logits(s, NULL) == NULL && peftrt_last_status() == PEFTRT_ERR_INVALID_ARGUMENT);
    peftrt_token next;
    EXPECT_STATUS(peftrt_session_sample(s, &next), PEFTRT_ERR_INVALID_ARGUMENT);
    /* Bad sampling parameters. */
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.top_p = 0;
    EXPECT_STATUS(peftrt_session_set_sampling(s, &sp), PEFTRT_ERR_INVALID_ARGUMENT);
    sp = peftrt_sampling_default_params();
    sp.top_k = -3;
    EXPECT_STATUS(peftrt_session_generate(s, t, 1, &sp, NULL, NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    const char *empty_stop[1] = {""};
    sp = peftrt_sampling_default_params();
    sp.stop = empty_stop;
    sp.n_stop = 1;
    EXPECT_STATUS(peftrt_session_generate(s, t, 1, &sp, NULL, NULL, NULL), PEFTRT_ERR_INVALID_ARGUMENT);
    /* Bad session params. */
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = info.n_ctx_train + 1;
    EXPECT_NULL(peftrt_session_create(m, &p), PEFTRT_ERR_INVALID_ARGUMENT);
    p = peftrt_session_default_params();
    p.n_batch = -1;
    EXPECT_NULL(peftrt_session_create(m, &p), PEFTRT_ERR_INVALID_ARGUMENT);
    /* A full context. */
    peftrt_session *tiny = small_session(m, 4);
    CHECK(tiny != NULL);
    peftrt_token five[5] = {1, 2, 3, 4, 5};
    EXPECT_STATUS(peftrt_session_eval(tiny, five, 5), PEFTRT_ERR_CONTEXT_FULL);
    EXPECT_STATUS(peftrt_session_eval(tiny, five, 3), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_eval(tiny, five, 2), PEFTRT_ERR_CONTEXT_FULL);
    peftrt_generation g = {.struct_size = sizeof g};
    EXPECT_STATUS(peftrt_session_generate(tiny, five, 1, NULL, NULL, NULL, &g), PEFTRT_OK);
    CHECK(g.stop == PEFTRT_STOP_CONTEXT_FULL || g.stop == PEFTRT_STOP_EOS);
    EXPECT_STATUS(peftrt_session_free(tiny), PEFTRT_OK);
}

static void test_handles(peftrt_model *m) {
    /* Freed handles, used again (detected while no new handle took the address). */
    peftrt_model *m2 = peftrt_model_load(model_dir, NULL);
    CHECK(m2 != NULL);
    peftrt_adapter *a2 = peftrt_adapter_load(m2, adapter_dir, NULL);
    CHECK(a2 != NULL);
    peftrt_session *s2 = small_session(m2, 32);
    CHECK(s2 != NULL);
    /* An adapter of one model handle is refused by a session of another. */
    peftrt_session *s = small_session(m, 32);
    EXPECT_STATUS(peftrt_session_set_adapters(s, &a2, NULL, 1), PEFTRT_ERR_ADAPTER_MISMATCH);
    /* Non-finite scales. */
    float nan_scale = 0.0f / 0.0f;
    EXPECT_STATUS(peftrt_session_set_adapters(s2, &a2, &nan_scale, 1), PEFTRT_ERR_INVALID_ARGUMENT);
    /* A handle of the wrong kind. */
    EXPECT_STATUS(peftrt_model_get_info((peftrt_model *)s2, &(peftrt_model_info){.struct_size = sizeof(peftrt_model_info)}),
                  PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_session_reset((peftrt_session *)m2), PEFTRT_ERR_INVALID_HANDLE);
    /* A pointer that never was a handle. */
    int not_a_handle = 0;
    EXPECT_STATUS(peftrt_session_reset((peftrt_session *)&not_a_handle), PEFTRT_ERR_INVALID_HANDLE);

    /* Free order does not matter: the session keeps its adapter and model alive. */
    EXPECT_STATUS(peftrt_session_set_adapters(s2, &a2, NULL, 1), PEFTRT_OK);
    EXPECT_STATUS(peftrt_model_free(m2), PEFTRT_OK);
    EXPECT_STATUS(peftrt_adapter_free(a2), PEFTRT_OK);
    peftrt_token t[3] = {1, 2, 3};
    EXPECT_STATUS(peftrt_session_eval(s2, t, 3), PEFTRT_OK);
    CHECK(peftrt_session_logits(s2, NULL) != NULL);
    EXPECT_STATUS(peftrt_session_free(s2), PEFTRT_OK);
    /* And then again: each is detected. */
    EXPECT_STATUS(peftrt_model_free(m2), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_adapter_free(a2), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_session_free(s2), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_session_eval(s2, t, 3), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_session_cancel(s2), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_NULL(peftrt_session_create(m2, NULL), PEFTRT_ERR_INVALID_HANDLE);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
}

/* Counts pieces; stops after `stop_after` of them (0 = never). */
typedef struct {
    int pieces;
    int stop_after;
} counter;

static int count_pieces(const char *text, size_t len, void *user_data) {
    counter *c = user_data;
    CHECK(text[len] == 0);
    c->pieces++;
    return c->stop_after && c->pieces >= c->stop_after;
}

/* A callback that calls back into the session generating: refused, not a deadlock. */
typedef struct {
    peftrt_session *s;
    peftrt_status reentered;
} reenter_ctx;

static int reenter(const char *text, size_t len, void *user_data) {
    (void)text;
    (void)len;
    reenter_ctx *c = user_data;
    peftrt_token t = 1;
    c->reentered = peftrt_session_eval(c->s, &t, 1);
    return 1;
}

static void test_callback_stops(peftrt_model *m, const peftrt_token *prompt, int32_t n) {
    peftrt_session *s = small_session(m, 128);
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = 40;
    sp.ignore_eos = true;
    counter c = {.pieces = 0, .stop_after = 1};
    peftrt_generation g = {.struct_size = sizeof g};
    EXPECT_STATUS(peftrt_session_generate(s, prompt, n, &sp, count_pieces, &c, &g), PEFTRT_OK);
    CHECK(c.pieces == 1);
    CHECK(g.stop == PEFTRT_STOP_CALLBACK);
    CHECK(g.n_tokens >= 1 && g.n_tokens < 40);
    /* The session carries on after it. */
    counter all = {0, 0};
    EXPECT_STATUS(peftrt_session_generate(s, prompt, 1, &sp, count_pieces, &all, &g), PEFTRT_OK);
    CHECK(all.pieces >= 1 && g.stop == PEFTRT_STOP_MAX_TOKENS && g.n_tokens == 40);
    reenter_ctx r = {.s = s, .reentered = PEFTRT_OK};
    EXPECT_STATUS(peftrt_session_generate(s, prompt, 1, &sp, reenter, &r, &g), PEFTRT_OK);
    CHECK(r.reentered == PEFTRT_ERR_BUSY);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
}

/* Cancel and busy: the generating thread blocks in its callback until the other thread has
   tried the session (BUSY) and cancelled it; the next layer then stops generation. */
typedef struct {
    peftrt_session *s;
    atomic_int in_callback;
    atomic_int cancelled;
    peftrt_status busy_eval, busy_free, cancel;
} cancel_ctx;

static int wait_for_cancel(const char *text, size_t len, void *user_data) {
    (void)text;
    (void)len;
    cancel_ctx *c = user_data;
    atomic_store(&c->in_callback, 1);
    while (!atomic_load(&c->cancelled)) {
    }
    return 0;
}

static void *canceller(void *arg) {
    cancel_ctx *c = arg;
    while (!atomic_load(&c->in_callback)) {
    }
    peftrt_token t = 1;
    c->busy_eval = peftrt_session_eval(c->s, &t, 1);
    c->busy_free = peftrt_session_free(c->s);
    c->cancel = peftrt_session_cancel(c->s);
    atomic_store(&c->cancelled, 1);
    return NULL;
}

static void test_cancel(peftrt_model *m, const peftrt_token *prompt, int32_t n) {
    cancel_ctx c = {.s = small_session(m, 200)};
    atomic_init(&c.in_callback, 0);
    atomic_init(&c.cancelled, 0);
    pthread_t th;
    pthread_create(&th, NULL, canceller, &c);
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = 100;
    sp.ignore_eos = true;
    peftrt_generation g = {.struct_size = sizeof g};
    g.n_tokens = -5;
    EXPECT_STATUS(peftrt_session_generate(c.s, prompt, n, &sp, wait_for_cancel, &c, &g), PEFTRT_ERR_CANCELLED);
    atomic_store(&c.in_callback, 1); /* should the callback never have run: fail, not hang */
    pthread_join(th, NULL);
    CHECK(c.busy_eval == PEFTRT_ERR_BUSY);
    CHECK(c.busy_free == PEFTRT_ERR_BUSY);
    CHECK(c.cancel == PEFTRT_OK);
    CHECK(g.n_tokens == -5); /* not filled on cancel */
    /* The session keeps the prompt and the tokens evaluated before the cancel, and works on. */
    int32_t kept = peftrt_session_tokens(c.s, NULL, 0);
    CHECK(kept <= -n);
    peftrt_token one = 1;
    EXPECT_STATUS(peftrt_session_eval(c.s, &one, 1), PEFTRT_OK);
    CHECK(peftrt_session_logits(c.s, NULL) != NULL);
    CHECK(peftrt_session_tokens(c.s, NULL, 0) == kept - 1);
    /* A cancel with nothing running does not affect the next call. */
    EXPECT_STATUS(peftrt_session_cancel(c.s), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_eval(c.s, &one, 1), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_free(c.s), PEFTRT_OK);
}

/* Cancel during a long prompt: the other thread keeps cancelling until the eval returns; one
   token per forward pass makes the prompt take a few hundred passes, so a cancel lands. */
typedef struct {
    peftrt_session *s;
    atomic_int done;
    int cancels, failed; /* read after the join */
} prefill_ctx;

static void *keep_cancelling(void *arg) {
    prefill_ctx *c = arg;
    /* Cancels sent before the eval starts are dropped by design, and a scheduler may run the
       whole eval before this thread (valgrind does), so wait until the session is busy: its
       eval has begun. */
    while (!atomic_load(&c->done) && peftrt_session_tokens(c->s, NULL, 0) != PEFTRT_BUFFER_ERROR)
        sched_yield();
    while (!atomic_load(&c->done)) {
        c->failed |= peftrt_session_cancel(c->s) != PEFTRT_OK;
        c->cancels++;
    }
    return NULL;
}

static void test_cancel_prefill(peftrt_model *m) {
    peftrt_model_info info = {.struct_size = sizeof info};
    peftrt_model_get_info(m, &info);
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = info.n_ctx_train < 512 ? info.n_ctx_train : 512;
    p.n_batch = 1;
    p.n_threads = 1;
    prefill_ctx c = {.s = peftrt_session_create(m, &p)};
    atomic_init(&c.done, 0);
    peftrt_token *long_prompt = malloc((size_t)p.n_ctx * sizeof *long_prompt);
    for (int i = 0; i < p.n_ctx; i++) long_prompt[i] = 1 + i % 50;
    pthread_t th;
    pthread_create(&th, NULL, keep_cancelling, &c);
    /* The canceller's probe holds the session for an instant: an eval that meets it gets
       PEFTRT_ERR_BUSY without touching the session, and is simply sent again. */
    peftrt_status st;
    while ((st = peftrt_session_eval(c.s, long_prompt, p.n_ctx)) == PEFTRT_ERR_BUSY) sched_yield();
    EXPECT_STATUS(st, PEFTRT_ERR_CANCELLED);
    atomic_store(&c.done, 1);
    pthread_join(th, NULL);
    CHECK(c.cancels > 0 && !c.failed);
    /* As before the call: nothing cached, no logits; then it works. */
    CHECK(peftrt_session_tokens(c.s, NULL, 0) == 0);
    CHECK(peftrt_session_logits(c.s, NULL) == NULL);
    EXPECT_STATUS(peftrt_session_eval(c.s, long_prompt, 8), PEFTRT_OK);
    CHECK(peftrt_session_tokens(c.s, NULL, 0) == -8);
    EXPECT_STATUS(peftrt_session_free(c.s), PEFTRT_OK);
    free(long_prompt);
}

/* ---------------------------------------------------------------- hostile files (issue #18) */

/* A load that must fail: NULL, status `want`, and a message containing `needle`. */
#define EXPECT_LOAD_FAILS(call, want, needle)                                                                          \
    do {                                                                                                               \
        void *h_ = (call);                                                                                             \
        CHECK(h_ == NULL);                                                                                             \
        CHECK(peftrt_last_status() == (want));                                                                         \
        CHECK(strstr(peftrt_last_error(), (needle)) != NULL);                                                          \
        if (h_ != NULL) fprintf(stderr, "  (%s loaded)\n", #call);                                                    \
        if (peftrt_last_status() != (want))                                                                            \
            fprintf(stderr, "  got %s, want %s\n", peftrt_status_str(peftrt_last_status()), #want);                   \
    } while (0)

static char tmp_root[PATH_MAX];

static void path_in(char *out, const char *dir, const char *name) { snprintf(out, PATH_MAX, "%s/%s", dir, name); }

/* A fresh directory `name` under the suite's temporary root. */
static const char *scratch_dir(const char *name) {
    static char dirs[64][PATH_MAX];
    static int n = 0;
    char *d = dirs[n++ % 64];
    path_in(d, tmp_root, name);
    CHECK(mkdir(d, 0700) == 0);
    return d;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    buf[got] = 0;
    *len = got;
    return buf;
}

static void write_bytes(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    CHECK(fwrite(data, 1, len, f) == len);
    fclose(f);
}

static void write_text(const char *path, const char *text) { write_bytes(path, text, strlen(text)); }

/* Links `name` in `dir` to the file of the same name in `src` (big files are not copied). */
static void link_from(const char *dir, const char *src, const char *name) {
    char from[PATH_MAX], to[PATH_MAX], abs[PATH_MAX];
    path_in(from, src, name);
    path_in(to, dir, name);
    CHECK(realpath(from, abs) != NULL);
    CHECK(symlink(abs, to) == 0);
}

/* Copies `name` from `src` into `dir`; with `max` > 0 only its first `max` bytes. */
static void copy_from(const char *dir, const char *src, const char *name, size_t max) {
    char from[PATH_MAX], to[PATH_MAX];
    path_in(from, src, name);
    path_in(to, dir, name);
    size_t len;
    char *data = read_file(from, &len);
    CHECK(data != NULL);
    if (!data) return;
    write_bytes(to, data, max && max < len ? max : len);
    free(data);
}

/* Rewrites `"key": value` (a scalar, or null) in a JSON file to `"key": raw`, or adds the key
   when it is absent. Enough for the pretty-printed configs of the fixtures and of transformers. */
static void set_json_key(const char *path, const char *key, const char *raw) {
    size_t len;
    char *text = read_file(path, &len);
    CHECK(text != NULL);
    if (!text) return;
    char quoted[256];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    char *out = malloc(len + strlen(raw) + strlen(quoted) + 16);
    char *at = strstr(text, quoted);
    if (at) {
        char *colon = strchr(at + strlen(quoted), ':');
        char *end = colon + 1;
        int depth = 0;
        while (*end && (depth > 0 || (*end != ',' && *end != '}' && *end != '\n'))) {
            if (*end == '{' || *end == '[') depth++;
            if (*end == '}' || *end == ']') depth--;
            end++;
        }
        sprintf(out, "%.*s %s%s", (int)(colon + 1 - text), text, raw, end);
    } else {
        char *brace = strchr(text, '{');
        sprintf(out, "%.*s%s: %s,%s", (int)(brace + 1 - text), text, quoted, raw, brace + 1);
    }
    write_text(path, out);
    free(out);
    free(text);
}

/* A model directory: config.json (copied, to be edited) and links to the other files. */
static const char *model_copy(const char *name, int with_weights, int with_tokenizer) {
    const char *d = scratch_dir(name);
    copy_from(d, model_dir, "config.json", 0);
    if (with_weights) link_from(d, model_dir, "model.safetensors");
    if (with_tokenizer) {
        link_from(d, model_dir, "tokenizer.json");
        link_from(d, model_dir, "tokenizer_config.json");
    }
    return d;
}

static void expect_bad_config(const char *name, const char *key, const char *raw, peftrt_status want,
                              const char *needle) {
    const char *d = model_copy(name, 1, 1);
    char cfg[PATH_MAX];
    path_in(cfg, d, "config.json");
    set_json_key(cfg, key, raw);
    int before = failures;
    EXPECT_LOAD_FAILS(peftrt_model_load(d, NULL), want, needle);
    if (failures > before) fprintf(stderr, "  in case %s (%s: %s)\n", name, key, raw);
}

/* Loads `dir` on another thread; a load still running after `seconds` hangs. */
typedef struct {
    const char *dir;
    peftrt_model *m;
    peftrt_status st;
    char msg[512];
} load_job;

static void *load_in_thread(void *arg) {
    load_job *j = arg;
    j->m = peftrt_model_load(j->dir, NULL);
    j->st = peftrt_last_status();
    snprintf(j->msg, sizeof j->msg, "%s", peftrt_last_error());
    return NULL;
}

/* config.json a FIFO that nobody writes: reading it would block forever (issue #18 row 10).
   The load must fail at once; if it hangs, the FIFO is opened and closed here to release it,
   so the suite reports the failure instead of hanging. */
static void test_fifo_config(void) {
    const char *d = model_copy("fifo-config", 1, 1);
    char cfg[PATH_MAX];
    path_in(cfg, d, "config.json");
    CHECK(unlink(cfg) == 0);
    CHECK(mkfifo(cfg, 0600) == 0);
    load_job j = {.dir = d};
    pthread_t th;
    pthread_create(&th, NULL, load_in_thread, &j);
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 30;
    if (pthread_timedjoin_np(th, NULL, &until) == ETIMEDOUT) {
        CHECK(!"peftrt_model_load with a FIFO as config.json hung");
        int fd = open(cfg, O_WRONLY | O_NONBLOCK);
        if (fd >= 0) close(fd);
        pthread_join(th, NULL);
    }
    CHECK(j.m == NULL);
    CHECK(j.st == PEFTRT_ERR_IO || j.st == PEFTRT_ERR_FORMAT);
    CHECK(strstr(j.msg, "config.json") != NULL);
    if (j.m) peftrt_model_free(j.m);
}

/* A context whose KV cache cannot be allocated: NULL and PEFTRT_ERR_OUT_OF_MEMORY, not an abort.
   The config claims 2^31 positions; n_ctx INT32_MAX needs (2 x layers x kv width x 4) bytes
   per position: 512 GiB for tiny-llama, 46 TiB for SmolLM2. A system that overcommits memory
   (vm.overcommit_memory = 1) may grant it untouched: the session must then work. */
static void test_huge_context(void) {
    const char *d = model_copy("huge-context", 1, 0);
    char cfg[PATH_MAX];
    path_in(cfg, d, "config.json");
    set_json_key(cfg, "max_position_embeddings", "2147483648");
    peftrt_model_params mp = peftrt_model_default_params();
    mp.no_tokenizer = true;
    peftrt_model *big = peftrt_model_load(d, &mp);
    CHECK(big != NULL);
    if (!big) return;
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = INT32_MAX;
    p.n_threads = 1;
    peftrt_session *s = peftrt_session_create(big, &p);
    size_t len = 0;
    char *policy = read_file("/proc/sys/vm/overcommit_memory", &len);
    int always = policy && policy[0] == '1';
    free(policy);
    if (s == NULL || !always) {
        CHECK(s == NULL);
        CHECK(peftrt_last_status() == PEFTRT_ERR_OUT_OF_MEMORY);
        CHECK(strstr(peftrt_last_error(), "KV cache") != NULL && strstr(peftrt_last_error(), "n_ctx") != NULL);
    }
    if (s) {
        peftrt_token t = 1;
        EXPECT_STATUS(peftrt_session_eval(s, &t, 1), PEFTRT_OK);
        EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
    }
    /* The model is fine with a context that fits. */
    p.n_ctx = 32;
    s = peftrt_session_create(big, &p);
    CHECK(s != NULL);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
    EXPECT_STATUS(peftrt_model_free(big), PEFTRT_OK);
}

static void test_hostile_models(void) {
    /* Missing files: IO, naming the file. */
    const char *d = model_copy("no-config", 1, 1);
    char p[PATH_MAX];
    path_in(p, d, "config.json");
    CHECK(unlink(p) == 0);
    EXPECT_LOAD_FAILS(peftrt_model_load(d, NULL), PEFTRT_ERR_IO, "config.json");
    EXPECT_LOAD_FAILS(peftrt_model_load(model_copy("no-weights", 0, 1), NULL), PEFTRT_ERR_IO, "model.safetensors");
    EXPECT_LOAD_FAILS(peftrt_model_load(model_copy("no-tokenizer", 1, 0), NULL), PEFTRT_ERR_IO, "tokenizer.json");
    path_in(p, model_dir, "config.json");
    EXPECT_LOAD_FAILS(peftrt_model_load(p, NULL), PEFTRT_ERR_IO, "not a directory");

    /* Safetensors: truncated inside the tensor data, a header longer than the file. */
    char src[PATH_MAX];
    path_in(src, model_dir, "model.safetensors");
    size_t len;
    char *st = read_file(src, &len);
    CHECK(st != NULL && len > 8);
    if (st) {
        uint64_t header = 0;
        memcpy(&header, st, 8); /* little-endian u64 */
        d = model_copy("truncated-weights", 0, 1);
        path_in(p, d, "model.safetensors");
        write_bytes(p, st, (size_t)(8 + header + 100));
        EXPECT_LOAD_FAILS(peftrt_model_load(d, NULL), PEFTRT_ERR_FORMAT, "model.safetensors");
        d = model_copy("lying-header", 0, 1);
        path_in(p, d, "model.safetensors");
        uint64_t lie = (uint64_t)len * 2;
        memcpy(st, &lie, 8);
        write_bytes(p, st, (size_t)(8 + header));
        EXPECT_LOAD_FAILS(peftrt_model_load(d, NULL), PEFTRT_ERR_FORMAT, "model.safetensors");
        free(st);
    }

    /* config.json: malformed, NaN or out-of-range values, an EOS id outside the vocabulary. */
    d = model_copy("config-not-json", 1, 1);
    path_in(p, d, "config.json");
    write_text(p, "{ \"model_type\": \"llama\", ");
    EXPECT_LOAD_FAILS(peftrt_model_load(d, NULL), PEFTRT_ERR_FORMAT, "config.json");
    expect_bad_config("nan-eps", "rms_norm_eps", "NaN", PEFTRT_ERR_FORMAT, "config.json");
    expect_bad_config("zero-eps", "rms_norm_eps", "0", PEFTRT_ERR_FORMAT, "rms_norm_eps");
    expect_bad_config("negative-theta", "rope_theta", "-1.0", PEFTRT_ERR_FORMAT, "rope_theta");
    expect_bad_config("layers-string", "num_hidden_layers", "\"two\"", PEFTRT_ERR_FORMAT, "num_hidden_layers");
    peftrt_model_info info = {.struct_size = sizeof info};
    peftrt_model *m = peftrt_model_load(model_dir, NULL);
    CHECK(m != NULL && peftrt_model_get_info(m, &info) == PEFTRT_OK);
    peftrt_model_free(m);
    char vocab[32];
    snprintf(vocab, sizeof vocab, "%d", info.vocab_size);
    expect_bad_config("eos-outside-vocab", "eos_token_id", vocab, PEFTRT_ERR_FORMAT, "eos_token_id");

    /* Well-formed, but not what peftrt runs: UNSUPPORTED. */
    expect_bad_config("gpt2", "model_type", "\"gpt2\"", PEFTRT_ERR_UNSUPPORTED, "gpt2");
    expect_bad_config("yarn", "rope_scaling", "{\"rope_type\": \"yarn\", \"factor\": 4.0}", PEFTRT_ERR_UNSUPPORTED,
                      "yarn");
    expect_bad_config("gptq", "quantization_config", "{\"quant_method\": \"gptq\", \"bits\": 4}",
                      PEFTRT_ERR_UNSUPPORTED, "gptq");

    test_fifo_config();
    test_huge_context();
}

/* One tensor of a hand-written safetensors file, its data all zero bytes. */
typedef struct {
    char name[160];
    const char *dtype;
    int64_t rows, cols;
    size_t elem;
} tensor_spec;

/* Writes a safetensors file: an 8-byte header length, the JSON header (with `metadata`, a
   JSON object's body or NULL), padded to 8 bytes, then the data. */
static void write_safetensors(const char *path, const tensor_spec *t, int n, const char *metadata) {
    size_t cap = 4096 + (size_t)n * 256 + (metadata ? strlen(metadata) : 0);
    char *h = malloc(cap);
    size_t at = (size_t)sprintf(h, "{\"__metadata__\":{%s}", metadata ? metadata : "");
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        size_t bytes = (size_t)(t[i].rows * t[i].cols) * t[i].elem;
        at += (size_t)sprintf(h + at, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}",
                              t[i].name, t[i].dtype, (long long)t[i].rows, (long long)t[i].cols, off, off + bytes);
        off += bytes;
    }
    h[at++] = '}';
    while (at % 8) h[at++] = ' ';
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        uint64_t len = at;
        fwrite(&len, 8, 1, f);
        fwrite(h, 1, at, f);
        char *zeros = calloc(off ? off : 1, 1);
        fwrite(zeros, 1, off, f);
        free(zeros);
        fclose(f);
    }
    free(h);
}

/* An adapter on every layer's q_proj (rank 2; q_proj is [hidden, hidden] in the models used
   here), lora_A stored as `a_dtype` (element size `a_elem`), with safetensors `metadata`. */
static const char *write_adapter(const char *name, const char *base, const char *a_dtype, size_t a_elem,
                                 const char *metadata) {
    peftrt_model *m = peftrt_model_load(model_dir, NULL);
    peftrt_model_info info = {.struct_size = sizeof info};
    CHECK(m != NULL && peftrt_model_get_info(m, &info) == PEFTRT_OK);
    peftrt_model_free(m);
    char dir_name[128];
    snprintf(dir_name, sizeof dir_name, "adapter-%s", name);
    const char *d = scratch_dir(dir_name);
    char p[PATH_MAX], cfg[512];
    path_in(p, d, "adapter_config.json");
    snprintf(cfg, sizeof cfg,
             "{\n  \"peft_type\": \"LORA\",\n  \"base_model_name_or_path\": \"%s\",\n  \"r\": 2,\n"
             "  \"lora_alpha\": 4,\n  \"bias\": \"none\",\n  \"target_modules\": [\"q_proj\"]\n}\n",
             base);
    write_text(p, cfg);
    int n = 2 * info.n_layers;
    tensor_spec *t = calloc((size_t)n, sizeof *t);
    for (int l = 0; l < info.n_layers; l++) {
        tensor_spec *a = &t[2 * l], *b = &t[2 * l + 1];
        snprintf(a->name, sizeof a->name, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        snprintf(b->name, sizeof b->name, "base_model.model.model.layers.%d.self_attn.q_proj.lora_B.weight", l);
        *a = (tensor_spec){.dtype = a_dtype, .rows = 2, .cols = info.hidden_size, .elem = a_elem};
        snprintf(a->name, sizeof a->name, "base_model.model.model.layers.%d.self_attn.q_proj.lora_A.weight", l);
        b->dtype = "F32";
        b->rows = info.hidden_size;
        b->cols = 2;
        b->elem = 4;
    }
    path_in(p, d, "adapter_model.safetensors");
    write_safetensors(p, t, n, metadata);
    free(t);
    return d;
}

static void edit_adapter_config(const char *dir, const char *key, const char *raw) {
    char p[PATH_MAX];
    path_in(p, dir, "adapter_config.json");
    set_json_key(p, key, raw);
}

static void test_hostile_adapters(peftrt_model *m) {
    /* A well-formed hand-written adapter loads: the cases below differ from it in one thing. */
    const char *own = strrchr(model_dir, '/') ? strrchr(model_dir, '/') + 1 : model_dir;
    const char *d = write_adapter("ok", own, "F32", 4, NULL);
    peftrt_adapter *a = peftrt_adapter_load(m, d, NULL);
    CHECK(a != NULL);
    EXPECT_STATUS(peftrt_adapter_free(a), PEFTRT_OK);

    /* Missing files: IO; the pickle-only format: UNSUPPORTED. */
    char p[PATH_MAX], q[PATH_MAX];
    d = write_adapter("no-weights", own, "F32", 4, NULL);
    path_in(p, d, "adapter_model.safetensors");
    CHECK(unlink(p) == 0);
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_IO, "adapter_model.safetensors");
    d = write_adapter("pickle-only", own, "F32", 4, NULL);
    path_in(p, d, "adapter_model.safetensors");
    path_in(q, d, "adapter_model.bin");
    CHECK(rename(p, q) == 0);
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_UNSUPPORTED, "adapter_model.bin");
    d = write_adapter("no-config", own, "F32", 4, NULL);
    path_in(p, d, "adapter_config.json");
    CHECK(unlink(p) == 0);
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_IO, "adapter_config.json");

    /* Malformed: FORMAT. */
    d = write_adapter("config-not-json", own, "F32", 4, NULL);
    path_in(p, d, "adapter_config.json");
    write_text(p, "{\"r\": 2,");
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_FORMAT, "adapter_config.json");
    d = write_adapter("truncated", own, "F32", 4, NULL);
    path_in(p, d, "adapter_model.safetensors");
    size_t len;
    char *st = read_file(p, &len);
    CHECK(st != NULL);
    if (st) {
        write_bytes(p, st, len - 16);
        EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_FORMAT, "adapter_model.safetensors");
        uint64_t lie = (uint64_t)len * 4;
        memcpy(st, &lie, 8);
        write_bytes(p, st, len);
        EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_FORMAT, "adapter_model.safetensors");
        free(st);
    }
    /* Non-float LoRA weights: refused, naming the tensor (never loaded as raw byte values). */
    d = write_adapter("u8-lora-a", own, "U8", 1, NULL);
    a = peftrt_adapter_load(m, d, NULL);
    CHECK(a == NULL);
    CHECK(peftrt_last_status() != PEFTRT_OK && strstr(peftrt_last_error(), "lora_A") != NULL);
    if (a) peftrt_adapter_free(a);
    d = write_adapter("i64-lora-a", own, "I64", 8, NULL);
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_UNSUPPORTED, "lora_A");

    /* Well-formed PEFT configs peftrt does not run: UNSUPPORTED, naming the key. */
    d = write_adapter("ia3", own, "F32", 4, NULL);
    edit_adapter_config(d, "peft_type", "\"IA3\"");
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_UNSUPPORTED, "IA3");
    d = write_adapter("bias-all", own, "F32", 4, NULL);
    edit_adapter_config(d, "bias", "\"all\"");
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_UNSUPPORTED, "bias");
    d = write_adapter("modules-to-save", own, "F32", 4, NULL);
    edit_adapter_config(d, "modules_to_save", "[\"lm_head\"]");
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_UNSUPPORTED, "modules_to_save");

    /* Made for another model. With a fingerprint of another base: ADAPTER_MISMATCH, and the
       message names the C field that overrides it, not the CLI flag. */
    d = write_adapter("other-fingerprint", own, "F32", 4,
                      "\"peftrt.base_model\":\"{\\\"version\\\":1,\\\"structure\\\":\\\"0000\\\",\\\"samples\\\":[]}\"");
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, NULL), PEFTRT_ERR_ADAPTER_MISMATCH,
                      "peftrt_adapter_params.allow_base_mismatch");
    CHECK(strstr(peftrt_last_error(), "--allow-base-mismatch") == NULL);
    peftrt_adapter_params ap = peftrt_adapter_default_params();
    ap.allow_base_mismatch = true;
    a = peftrt_adapter_load(m, d, &ap);
    CHECK(a != NULL);
    peftrt_adapter_free(a);
    /* Without a fingerprint, naming another model: a warning by default, refused with
       strict_base; naming this one (the directory's name) loads either way. */
    d = write_adapter("other-name", "SomeOrg/another-model-7B", "F32", 4, NULL);
    a = peftrt_adapter_load(m, d, NULL);
    CHECK(a != NULL);
    peftrt_adapter_free(a);
    ap = peftrt_adapter_default_params();
    ap.strict_base = true;
    EXPECT_LOAD_FAILS(peftrt_adapter_load(m, d, &ap), PEFTRT_ERR_ADAPTER_MISMATCH, "another-model-7B");
    CHECK(strstr(peftrt_last_error(), "peftrt_adapter_params.strict_base") != NULL);
    ap.allow_base_mismatch = true;
    a = peftrt_adapter_load(m, d, &ap);
    CHECK(a != NULL);
    peftrt_adapter_free(a);
    ap = peftrt_adapter_default_params();
    ap.strict_base = true;
    char hub[PATH_MAX];
    snprintf(hub, sizeof hub, "SomeOrg/%s", own);
    d = write_adapter("same-name", hub, "F32", 4, NULL);
    a = peftrt_adapter_load(m, d, &ap);
    CHECK(a != NULL);
    peftrt_adapter_free(a);
    /* Shapes of another model: ADAPTER_MISMATCH (not every bind error is one: the FORMAT and
       UNSUPPORTED cases above keep their status). */
    peftrt_model *other = peftrt_model_load(other_model_dir, NULL);
    d = write_adapter("other-shapes", own, "F32", 4, NULL);
    EXPECT_LOAD_FAILS(peftrt_adapter_load(other, d, NULL), PEFTRT_ERR_ADAPTER_MISMATCH, "q_proj");
    peftrt_model_free(other);
}

static void test_hostile_files(peftrt_model *m) {
    const char *base = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmp_root, sizeof tmp_root, "%s/peftrt-bad-input-XXXXXX", base);
    CHECK(mkdtemp(tmp_root) != NULL);
    test_hostile_models();
    test_hostile_adapters(m);
    char rm[PATH_MAX + 16];
    snprintf(rm, sizeof rm, "rm -rf '%s'", tmp_root);
    CHECK(system(rm) == 0);
}

/* A greedy reply from a fresh session, for the final health check. */
static int32_t reply(peftrt_model *m, const peftrt_token *prompt, int32_t n, peftrt_token *out) {
    peftrt_session *s = small_session(m, 128);
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = 16;
    peftrt_generation g = {.struct_size = sizeof g, .tokens = out, .n_tokens_max = 16};
    EXPECT_STATUS(peftrt_session_generate(s, prompt, n, &sp, NULL, NULL, &g), PEFTRT_OK);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);
    return g.n_tokens;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_DIR OTHER_MODEL_DIR\n", argv[0]);
        return 2;
    }
    model_dir = argv[1];
    adapter_dir = argv[2];
    other_model_dir = argv[3];
    CHECK(peftrt_last_status() == PEFTRT_OK && strcmp(peftrt_last_error(), "") == 0);

    peftrt_model *m = peftrt_model_load(model_dir, NULL);
    if (!m) {
        fprintf(stderr, "bad_input: cannot load %s: %s\n", model_dir, peftrt_last_error());
        return 1;
    }
    peftrt_token prompt[64];
    int32_t n = peftrt_tokenize(m, "The lighthouse keeper", true, prompt, 64);
    CHECK(n > 0);
    peftrt_token before[16], after[16];
    int32_t n_before = reply(m, prompt, n, before);

    peftrt_session *s = small_session(m, 64);
    test_version_and_layouts();
    test_nulls(m, s);
    test_files(m);
    test_buffers_and_ranges(m, s);
    test_constraints(m);
    test_engine(m);
    test_handles(m);
    test_callback_stops(m, prompt, n);
    test_cancel(m, prompt, n);
    test_cancel_prefill(m);
    test_hostile_files(m);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);

    /* Healthy: the same request gives the same reply as before all this. */
    int32_t n_after = reply(m, prompt, n, after);
    CHECK(n_before == n_after && n_before > 0 && memcmp(before, after, (size_t)n_before * sizeof *before) == 0);
    EXPECT_STATUS(peftrt_model_free(m), PEFTRT_OK);

    printf("bad_input: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
