/*
 * threads: N threads share one model (read-only); each has its own session and adapter. The
 * tokens each thread generates must equal those of the same request run alone, one after the
 * other, on the main thread. Exits 1 if any differ.
 *
 *   threads MODEL_DIR ADAPTER_A ADAPTER_B [N_THREADS] [MAX_TOKENS]
 *
 * Request i uses adapter A, B or none (i % 3) and one of a few prompts.
 */
#include <peftrt.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GEN 256

static const char *PROMPTS[] = {"Name three colours.", "What is a lighthouse?", "Count to five.",
                                "Say hello in French."};

typedef struct {
    peftrt_model *model;
    peftrt_adapter *adapter; /* NULL = none */
    const char *prompt;
    int max_tokens;
    peftrt_token out[MAX_GEN];
    int32_t n_out;
    int status; /* 0 = ok */
    char error[256];
} job;

static void *run(void *arg) {
    job *j = arg;
    j->status = 1;
    peftrt_token tokens[512];
    char text[2048];
    peftrt_chat_message msg = {.role = "user", .content = j->prompt};
    int32_t len = peftrt_chat_apply_template(j->model, &msg, 1, true, text, sizeof text);
    int32_t n = len < 0 ? len : peftrt_tokenize(j->model, text, false, tokens, 512);
    /* One worker thread per session: the parallelism here is across sessions. */
    peftrt_session_params sp = peftrt_session_default_params();
    sp.n_threads = 1;
    sp.n_ctx = n + j->max_tokens;
    peftrt_session *s = n > 0 ? peftrt_session_create(j->model, &sp) : NULL;
    if (s) {
        float one = 1.0f;
        peftrt_sampling_params p = peftrt_sampling_default_params();
        p.max_tokens = j->max_tokens;
        peftrt_generation g = {.struct_size = sizeof g, .tokens = j->out, .n_tokens_max = MAX_GEN};
        if (peftrt_session_set_adapters(s, &j->adapter, &one, j->adapter ? 1 : 0) == PEFTRT_OK &&
            peftrt_session_generate(s, tokens, n, &p, NULL, NULL, &g) == PEFTRT_OK) {
            j->n_out = g.n_tokens;
            j->status = 0;
        }
        peftrt_session_free(s);
    }
    if (j->status) snprintf(j->error, sizeof j->error, "%s", peftrt_last_error()); /* thread-local */
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_A ADAPTER_B [N_THREADS] [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    int n_threads = argc > 4 ? atoi(argv[4]) : 4;
    int max_tokens = argc > 5 ? atoi(argv[5]) : 16;
    if (n_threads < 1 || max_tokens < 1 || max_tokens > MAX_GEN) return 2;

    peftrt_model *model = peftrt_model_load(argv[1], NULL);
    if (!model) {
        fprintf(stderr, "threads: %s\n", peftrt_last_error());
        return 1;
    }
    peftrt_adapter *adapters[3] = {peftrt_adapter_load(model, argv[2], NULL), peftrt_adapter_load(model, argv[3], NULL),
                                   NULL};
    if (!adapters[0] || !adapters[1]) {
        fprintf(stderr, "threads: %s\n", peftrt_last_error());
        return 1;
    }

    job *alone = calloc((size_t)n_threads, sizeof *alone);
    job *together = calloc((size_t)n_threads, sizeof *together);
    for (int i = 0; i < n_threads; i++) {
        alone[i] = (job){.model = model, .adapter = adapters[i % 3], .prompt = PROMPTS[i % 4], .max_tokens = max_tokens};
        together[i] = alone[i];
    }
    for (int i = 0; i < n_threads; i++) run(&alone[i]);
    pthread_t *tids = calloc((size_t)n_threads, sizeof *tids);
    for (int i = 0; i < n_threads; i++) pthread_create(&tids[i], NULL, run, &together[i]);
    for (int i = 0; i < n_threads; i++) pthread_join(tids[i], NULL);

    int bad = 0;
    for (int i = 0; i < n_threads; i++) {
        const char *which = i % 3 == 0 ? "A" : i % 3 == 1 ? "B" : "none";
        if (alone[i].status || together[i].status) {
            fprintf(stderr, "request %d failed: %s%s\n", i, alone[i].error, together[i].error);
            bad = 1;
            continue;
        }
        int same = alone[i].n_out == together[i].n_out &&
                   memcmp(alone[i].out, together[i].out, (size_t)alone[i].n_out * sizeof(peftrt_token)) == 0;
        printf("request %d (adapter %-4s): %d tokens, %s\n", i, which, together[i].n_out,
               same ? "identical to the single-threaded run" : "DIFFERENT from the single-threaded run");
        bad |= !same;
    }
    /* Requests with different adapters must differ, or the check above proves little. */
    if (n_threads >= 2 && alone[0].n_out == alone[1].n_out && alone[0].prompt == alone[1].prompt &&
        memcmp(alone[0].out, alone[1].out, (size_t)alone[0].n_out * sizeof(peftrt_token)) == 0)
        printf("note: adapters A and B gave the same tokens\n");

    peftrt_adapter_free(adapters[0]);
    peftrt_adapter_free(adapters[1]);
    peftrt_model_free(model);
    free(alone);
    free(together);
    free(tids);
    if (bad)
        printf("threads: MISMATCH\n");
    else
        printf("threads: all %d threads match the single-threaded run\n", n_threads);
    return bad;
}
