/*
 * The C API under bad input (issue #5): NULL everywhere a pointer is taken, a missing model
 * path, an adapter for another base model, too-small buffers, out-of-range token ids,
 * invalid UTF-8, freed handles, a callback that stops early, cancel during generation, a
 * session used from two threads. Each must return its documented error and leave the
 * process healthy: the suite ends with a normal generation that must equal a fresh one.
 * Run under valgrind by `make test-ffi`.
 *
 *   bad_input MODEL_DIR ADAPTER_DIR OTHER_MODEL_DIR
 *
 * ADAPTER_DIR is an adapter for MODEL_DIR; OTHER_MODEL_DIR a base model of other shapes.
 */
#include <peftrt.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    CHECK(strstr(peftrt_last_error(), "another base model") != NULL);
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
    test_handles(m);
    test_callback_stops(m, prompt, n);
    test_cancel(m, prompt, n);
    test_cancel_prefill(m);
    EXPECT_STATUS(peftrt_session_free(s), PEFTRT_OK);

    /* Healthy: the same request gives the same reply as before all this. */
    int32_t n_after = reply(m, prompt, n, after);
    CHECK(n_before == n_after && n_before > 0 && memcmp(before, after, (size_t)n_before * sizeof *before) == 0);
    EXPECT_STATUS(peftrt_model_free(m), PEFTRT_OK);

    printf("bad_input: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
