/*
 * json_schema: output that always parses. The session's output is constrained to a JSON
 * Schema (compiled by llguidance against the model's vocabulary): tokens that cannot continue
 * a valid document are never sampled, and generation ends when the document is complete.
 * Prints the reply (one JSON document) to stdout; the stop reason and timings to stderr.
 *
 *   json_schema [--step] MODEL_DIR SCHEMA_FILE [PROMPT] [MAX_TOKENS] [ADAPTER_DIR]
 *
 * Greedy, with peftrt_session_generate(); with --step, token by token instead
 * (peftrt_session_eval() + peftrt_session_sample() under the same constraint).
 * Exit status: 0 when the reply is complete (the grammar ended), 3 when it was cut (max
 * tokens or context), 1 on an error, such as a schema that does not compile.
 */
#include <peftrt.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "json_schema: %s: %s (%s)\n", what, peftrt_last_error(), peftrt_status_str(peftrt_last_status()));
    return 1;
}

static int print_piece(const char *text, size_t len, void *user_data) {
    (void)user_data;
    fwrite(text, 1, len, stdout);
    return 0;
}

/* The whole file, NUL-terminated; *len gets its size. NULL if it cannot be read. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *grown = realloc(buf, cap);
            if (!grown) break;
            buf = grown;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f) || !buf;
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* Everything the run allocates, freed in one place whatever happens (free(NULL) and the
   peftrt_*_free(NULL) calls are no-ops that only set the last status). */
struct run {
    char *schema, *text;
    peftrt_token *tokens;
    peftrt_model *model;
    peftrt_adapter *adapter;
    peftrt_session *session;
};

static void cleanup(struct run *r) {
    if (r->session) peftrt_session_free(r->session);
    if (r->adapter) peftrt_adapter_free(r->adapter);
    if (r->model) peftrt_model_free(r->model);
    free(r->tokens);
    free(r->text);
    free(r->schema);
}

/* Generates the reply; 0 complete, 3 cut, 1 error. */
static int run(struct run *r, int step, int argc, char **argv) {
    const char *prompt = argc > 3 ? argv[3] : "Give me a JSON object.";
    int max_tokens = argc > 4 ? atoi(argv[4]) : 256;
    if (max_tokens <= 0) {
        fprintf(stderr, "json_schema: MAX_TOKENS must be at least 1\n");
        return 1;
    }
    size_t schema_len = 0;
    r->schema = read_file(argv[2], &schema_len);
    if (!r->schema) {
        fprintf(stderr, "json_schema: cannot read the schema file %s\n", argv[2]);
        return 1;
    }

    r->model = peftrt_model_load(argv[1], NULL);
    if (!r->model) return fail("loading the model");
    r->session = peftrt_session_create(r->model, NULL);
    if (!r->session) return fail("creating a session");
    if (argc > 5) {
        r->adapter = peftrt_adapter_load(r->model, argv[5], NULL);
        if (!r->adapter) return fail("loading the adapter");
        if (peftrt_session_set_adapters(r->session, &r->adapter, NULL, 1) != PEFTRT_OK)
            return fail("activating the adapter");
    }

    /* A schema that does not compile is refused before any token, with the compiler's
       message (which keyword, which position). */
    if (peftrt_session_set_constraint(r->session, PEFTRT_CONSTRAINT_JSON_SCHEMA, r->schema, schema_len) != PEFTRT_OK)
        return fail("compiling the schema");

    /* The prompt with the model's chat template, if it has one. */
    peftrt_model_info info = {.struct_size = sizeof info};
    if (peftrt_model_get_info(r->model, &info) != PEFTRT_OK) return fail("model info");
    if (info.has_chat_template) {
        peftrt_chat_message msg = {.role = "user", .content = prompt};
        int32_t need = -peftrt_chat_apply_template(r->model, &msg, 1, true, NULL, 0);
        if (need <= 0) return fail("chat template");
        r->text = malloc((size_t)need);
        if (!r->text || peftrt_chat_apply_template(r->model, &msg, 1, true, r->text, need) < 0)
            return fail("chat template");
    }
    const char *input = r->text ? r->text : prompt;
    int32_t n = -peftrt_tokenize(r->model, input, !r->text, NULL, 0);
    if (n <= 0) return fail("tokenizing");
    r->tokens = malloc((size_t)n * sizeof *r->tokens);
    if (!r->tokens || peftrt_tokenize(r->model, input, !r->text, r->tokens, n) != n) return fail("tokenizing");

    if (!step) {
        /* Greedy; the constraint starts over with each generate. */
        peftrt_sampling_params sp = peftrt_sampling_default_params();
        sp.max_tokens = max_tokens;
        peftrt_generation g = {.struct_size = sizeof g};
        if (peftrt_session_generate(r->session, r->tokens, n, &sp, print_piece, NULL, &g) != PEFTRT_OK)
            return fail("generating");
        printf("\n");
        fprintf(stderr, "%d tokens in %.1f ms, stop reason %d (%s)\n", g.n_tokens, g.decode_ms, (int)g.stop,
                g.stop == PEFTRT_STOP_EOS ? "complete" : "cut: not a complete document");
        return g.stop == PEFTRT_STOP_EOS ? 0 : 3;
    }

    /* Token by token: eval, then sample within the constraint (it advances by each sampled
       token); once the grammar is complete, the sampled token is the model's EOS. */
    if (peftrt_session_eval(r->session, r->tokens, n) != PEFTRT_OK) return fail("evaluating the prompt");
    for (int i = 0; i < max_tokens; i++) {
        peftrt_token t;
        if (peftrt_session_sample(r->session, &t) != PEFTRT_OK) return fail("sampling");
        if (peftrt_model_is_eos(r->model, t) == 1) {
            printf("\n");
            fprintf(stderr, "complete\n");
            return 0;
        }
        char piece[256];
        int32_t len = peftrt_detokenize(r->model, &t, 1, false, piece, sizeof piece);
        if (len > 0) fwrite(piece, 1, (size_t)len, stdout);
        peftrt_status st = peftrt_session_eval(r->session, &t, 1);
        if (st == PEFTRT_ERR_CONTEXT_FULL) break;
        if (st != PEFTRT_OK) return fail("evaluating");
    }
    printf("\n");
    fprintf(stderr, "cut: not a complete document\n");
    return 3;
}

int main(int argc, char **argv) {
    int step = argc > 1 && strcmp(argv[1], "--step") == 0;
    if (step) {
        argv++;
        argc--;
    }
    if (argc < 3) {
        fprintf(stderr, "usage: json_schema [--step] MODEL_DIR SCHEMA_FILE [PROMPT] [MAX_TOKENS] [ADAPTER_DIR]\n");
        return 2;
    }
    struct run r = {0};
    int status = run(&r, step, argc, argv);
    cleanup(&r);
    return status;
}
