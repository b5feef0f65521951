/*
 * engine: many requests at once on one model, each with its own adapter (continuous batching
 * through peftrt_engine). Request i takes adapter i mod (number of adapters), or the base
 * model when none is given. Prints each reply as it ends and the aggregate tokens/s.
 * With --check, each request is also run alone in a session (peftrt_session_generate, the
 * same n_batch) and its tokens must be the same: exit 1 otherwise.
 *
 *   engine [--check] MODEL_DIR REQUESTS MAX_TOKENS [ADAPTER ...]
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <peftrt.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_REQUESTS 64
#define MAX_ADAPTERS 16
#define MAX_PROMPT 1024

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static const char *questions[] = {
    "Name three colours.",
    "Write a haiku about a lighthouse.",
    "What is the capital of France?",
    "Describe a cat in one sentence.",
    "Give me a JSON object with a name and an age.",
    "List four fruits.",
    "What is 2 + 2?",
    "Tell me a short joke.",
};

/* One request: its prompt, its reply as it streams, and what it ended with. */
typedef struct {
    peftrt_token prompt[MAX_PROMPT];
    int32_t n_prompt;
    int adapter; /* index into the adapters, -1 = none */
    char text[1024];
    size_t len;
    peftrt_token *tokens; /* the generated tokens (copied in the done callback) */
    int32_t n_tokens;
    peftrt_stop_reason stop;
    peftrt_status status;
    int done;
} request;

static int on_text(const char *text, size_t len, void *user_data) {
    request *r = user_data;
    for (size_t i = 0; i < len && r->len + 1 < sizeof r->text; i++)
        r->text[r->len++] = text[i] == '\n' ? ' ' : text[i];
    r->text[r->len] = 0;
    return 0;
}

static void on_done(const peftrt_request_result *res, void *user_data) {
    request *r = user_data;
    r->status = res->status;
    r->stop = res->stop;
    r->n_tokens = res->n_tokens;
    r->tokens = malloc(sizeof(peftrt_token) * (size_t)(res->n_tokens > 0 ? res->n_tokens : 1));
    if (r->tokens) memcpy(r->tokens, res->tokens, sizeof(peftrt_token) * (size_t)res->n_tokens);
    r->done = 1;
    if (res->status != PEFTRT_OK) fprintf(stderr, "request %llu failed: %s\n", (unsigned long long)res->request, res->error);
}

int main(int argc, char **argv) {
    int check = argc > 1 && strcmp(argv[1], "--check") == 0;
    if (check) {
        argv++;
        argc--;
    }
    if (argc < 4) {
        fprintf(stderr, "usage: %s [--check] MODEL_DIR REQUESTS MAX_TOKENS [ADAPTER ...]\n", argv[0]);
        return 2;
    }
    int n_requests = atoi(argv[2]), max_tokens = atoi(argv[3]), n_adapters = argc - 4;
    if (n_requests < 1 || n_requests > MAX_REQUESTS || max_tokens < 1 || n_adapters > MAX_ADAPTERS) {
        fprintf(stderr, "engine: 1 to %d requests, MAX_TOKENS >= 1, at most %d adapters\n", MAX_REQUESTS, MAX_ADAPTERS);
        return 2;
    }

    int status = 1;
    peftrt_model *model = NULL;
    peftrt_engine *engine = NULL;
    peftrt_session *session = NULL;
    peftrt_adapter *adapters[MAX_ADAPTERS] = {0};
    request *reqs = calloc((size_t)n_requests, sizeof *reqs);
    if (!reqs) goto out;

    model = peftrt_model_load(argv[1], NULL);
    if (!model) goto fail;
    for (int i = 0; i < n_adapters; i++) {
        adapters[i] = peftrt_adapter_load(model, argv[4 + i], NULL);
        if (!adapters[i]) goto fail;
    }
    peftrt_model_info info = {.struct_size = sizeof info};
    if (peftrt_model_get_info(model, &info) != PEFTRT_OK) goto fail;

    /* Prompts: the questions in turn, through the chat template when the model has one. */
    int32_t longest = 0;
    for (int i = 0; i < n_requests; i++) {
        request *r = &reqs[i];
        const char *q = questions[i % (int)(sizeof questions / sizeof questions[0])];
        char text[4096];
        const char *input = q;
        if (info.has_chat_template) {
            peftrt_chat_message msg = {.role = "user", .content = q};
            if (peftrt_chat_apply_template(model, &msg, 1, true, text, sizeof text) < 0) goto fail;
            input = text;
        }
        r->n_prompt = peftrt_tokenize(model, input, !info.has_chat_template, r->prompt, MAX_PROMPT);
        if (r->n_prompt <= 0) goto fail;
        r->adapter = n_adapters ? i % n_adapters : -1;
        if (r->n_prompt > longest) longest = r->n_prompt;
    }

    peftrt_engine_params ep = peftrt_engine_default_params();
    ep.max_sequences = n_requests;
    ep.n_ctx = longest + max_tokens;
    engine = peftrt_engine_create(model, &ep);
    if (!engine) goto fail;
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = max_tokens;

    double t0 = now_ms();
    for (int i = 0; i < n_requests; i++) {
        request *r = &reqs[i];
        peftrt_request q = peftrt_request_default();
        q.prompt = r->prompt;
        q.n_prompt = r->n_prompt;
        if (r->adapter >= 0) {
            q.adapters = &adapters[r->adapter];
            q.n_adapters = 1;
        }
        q.sampling = &sp;
        q.on_text = on_text;
        q.on_done = on_done;
        q.user_data = r;
        if (peftrt_engine_submit(engine, &q, NULL) != PEFTRT_OK) goto fail;
    }
    if (peftrt_engine_run(engine) != PEFTRT_OK) goto fail;
    double elapsed = now_ms() - t0;

    long total = 0;
    for (int i = 0; i < n_requests; i++) {
        request *r = &reqs[i];
        if (!r->done || r->status != PEFTRT_OK) {
            fprintf(stderr, "engine: request %d did not end well\n", i);
            goto out;
        }
        total += r->n_tokens;
        printf("request %2d  adapter %-2d  %3d tokens  stop %d  %s\n", i, r->adapter, r->n_tokens, r->stop, r->text);
    }
    printf("engine: %d requests, %ld tokens in %.0f ms: %.1f tokens/s in all\n", n_requests, total, elapsed,
           total / (elapsed / 1e3));

    if (check) {
        /* Each request alone in a session with the engine's n_batch (the defaults agree). */
        peftrt_session_params ps = peftrt_session_default_params();
        ps.n_ctx = ep.n_ctx;
        session = peftrt_session_create(model, &ps);
        if (!session) goto fail;
        for (int i = 0; i < n_requests; i++) {
            request *r = &reqs[i];
            peftrt_adapter *const *set = r->adapter >= 0 ? &adapters[r->adapter] : NULL;
            if (peftrt_session_set_adapters(session, set, NULL, r->adapter >= 0 ? 1 : 0) != PEFTRT_OK) goto fail;
            if (peftrt_session_reset(session) != PEFTRT_OK) goto fail;
            peftrt_token alone[MAX_PROMPT];
            peftrt_generation g = {.struct_size = sizeof g, .tokens = alone, .n_tokens_max = MAX_PROMPT};
            if (peftrt_session_generate(session, r->prompt, r->n_prompt, &sp, NULL, NULL, &g) != PEFTRT_OK) goto fail;
            if (g.n_tokens != r->n_tokens || g.stop != r->stop ||
                memcmp(alone, r->tokens, sizeof(peftrt_token) * (size_t)r->n_tokens) != 0) {
                fprintf(stderr, "engine: request %d differs from the same request alone in a session\n", i);
                goto out;
            }
        }
        printf("engine: every request's tokens equal a lone session's\n");
    }
    status = 0;
    goto out;

fail:
    fprintf(stderr, "engine: %s: %s\n", peftrt_status_str(peftrt_last_status()), peftrt_last_error());
out:
    /* Any order: the engine keeps its model and adapters alive until it is freed. */
    peftrt_session_free(session);
    peftrt_engine_free(engine);
    for (int i = 0; i < n_adapters; i++) peftrt_adapter_free(adapters[i]);
    peftrt_model_free(model);
    if (reqs)
        for (int i = 0; i < n_requests; i++) free(reqs[i].tokens);
    free(reqs);
    return status;
}
