/*
 * multi_adapter: one model, two adapters, one session. Requests alternate between adapter A,
 * adapter B, both with scales (A x0.5 + B x0.5) and no adapter; each prints its latency.
 * Switching adapters copies no weights, so it costs microseconds.
 *
 *   multi_adapter MODEL_DIR ADAPTER_A ADAPTER_B [PROMPT] [ROUNDS] [MAX_TOKENS]
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <peftrt.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static int fail(const char *what) {
    fprintf(stderr, "multi_adapter: %s: %s\n", what, peftrt_last_error());
    return 1;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* Collects the reply into a fixed buffer (truncated if long). */
typedef struct {
    char text[512];
    size_t len;
} reply;

static int collect(const char *text, size_t len, void *user_data) {
    reply *r = user_data;
    for (size_t i = 0; i < len && r->len + 1 < sizeof r->text; i++)
        r->text[r->len++] = text[i] == '\n' ? ' ' : text[i];
    r->text[r->len] = 0;
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_A ADAPTER_B [PROMPT] [ROUNDS] [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    const char *prompt = argc > 4 ? argv[4] : "Name three colours.";
    int rounds = argc > 5 ? atoi(argv[5]) : 2;
    int max_tokens = argc > 6 ? atoi(argv[6]) : 24;

    peftrt_model *model = peftrt_model_load(argv[1], NULL);
    if (!model) return fail("loading the model");
    peftrt_adapter *a = peftrt_adapter_load(model, argv[2], NULL);
    if (!a) return fail("loading adapter A");
    peftrt_adapter *b = peftrt_adapter_load(model, argv[3], NULL);
    if (!b) return fail("loading adapter B");

    peftrt_model_info info = {.struct_size = sizeof info};
    peftrt_model_get_info(model, &info);
    char text[4096];
    const char *input = prompt;
    if (info.has_chat_template) {
        peftrt_chat_message msg = {.role = "user", .content = prompt};
        if (peftrt_chat_apply_template(model, &msg, 1, true, text, sizeof text) < 0) return fail("chat template");
        input = text;
    }
    peftrt_token tokens[1024];
    int32_t n = peftrt_tokenize(model, input, !info.has_chat_template, tokens, 1024);
    if (n <= 0) return fail("tokenizing (prompt too long for this example?)");

    peftrt_session_params params = peftrt_session_default_params();
    params.n_ctx = n + max_tokens;
    peftrt_session *session = peftrt_session_create(model, &params);
    if (!session) return fail("creating a session");
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = max_tokens;

    struct {
        const char *name;
        peftrt_adapter *set[2];
        float scales[2];
        size_t n;
    } requests[] = {
        {"A", {a}, {1.0f}, 1},
        {"B", {b}, {1.0f}, 1},
        {"A x0.5 + B x0.5", {a, b}, {0.5f, 0.5f}, 2},
        {"none", {NULL}, {0}, 0},
    };
    for (int round = 0; round < rounds; round++) {
        for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++) {
            double t0 = now_ms();
            if (peftrt_session_set_adapters(session, requests[i].set, requests[i].scales, requests[i].n) != PEFTRT_OK)
                return fail("setting adapters");
            double t1 = now_ms();
            peftrt_session_reset(session);
            reply r = {.len = 0};
            peftrt_generation g = {.struct_size = sizeof g};
            if (peftrt_session_generate(session, tokens, n, &sp, collect, &r, &g) != PEFTRT_OK)
                return fail("generating");
            double t2 = now_ms();
            printf("round %d  %-16s switch %6.3f ms  request %8.2f ms  (%d tokens)  %s\n", round, requests[i].name,
                   t1 - t0, t2 - t0, g.n_tokens, r.text);
        }
    }

    /* Any order: the session keeps its adapters and the model alive until it is freed. */
    peftrt_adapter_free(a);
    peftrt_adapter_free(b);
    peftrt_model_free(model);
    peftrt_session_free(session);
    return 0;
}
