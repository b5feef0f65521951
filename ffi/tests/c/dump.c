/*
 * Runs one request through the C API and writes what came out, for ffi/tests/c_api.rs to
 * compare with the Rust API: the prompt's tokens (chat template, or the raw text with
 * special tokens when the model has no template), the logits after evaluating them, and a
 * greedy generation (tokens and streamed text).
 *
 *   dump MODEL_DIR PROMPT OUT_FILE MAX_TOKENS [ADAPTER_DIR SCALE]...
 *
 * OUT_FILE (native-endian): int32 n_prompt, int32 prompt[n_prompt], int32 n_vocab,
 * float logits[n_vocab], int32 n_gen, int32 gen[n_gen], int32 n_text, char text[n_text].
 * Sessions: n_ctx = n_prompt + MAX_TOKENS, n_batch 16, 2 threads.
 */
#include <peftrt.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void die(const char *what) {
    fprintf(stderr, "dump: %s: %s\n", what, peftrt_last_error());
    exit(1);
}

typedef struct {
    char *text;
    size_t len;
} text_buf;

static int append(const char *piece, size_t len, void *user_data) {
    text_buf *t = user_data;
    t->text = realloc(t->text, t->len + len);
    memcpy(t->text + t->len, piece, len);
    t->len += len;
    return 0;
}

static void put_i32(FILE *f, int32_t v) { fwrite(&v, sizeof v, 1, f); }

int main(int argc, char **argv) {
    if (argc < 5 || (argc - 5) % 2) {
        fprintf(stderr, "usage: %s MODEL_DIR PROMPT OUT_FILE MAX_TOKENS [ADAPTER_DIR SCALE]...\n", argv[0]);
        return 2;
    }
    int32_t max_tokens = atoi(argv[4]);
    peftrt_model *m = peftrt_model_load(argv[1], NULL);
    if (!m) die("loading the model");
    size_t n_adapters = (size_t)(argc - 5) / 2;
    peftrt_adapter *adapters[8];
    float scales[8];
    if (n_adapters > 8) return 2;
    for (size_t i = 0; i < n_adapters; i++) {
        adapters[i] = peftrt_adapter_load(m, argv[5 + 2 * i], NULL);
        if (!adapters[i]) die("loading an adapter");
        scales[i] = (float)atof(argv[6 + 2 * i]);
    }

    peftrt_model_info info = {.struct_size = sizeof info};
    if (peftrt_model_get_info(m, &info)) die("model info");
    char *text = NULL;
    if (info.has_chat_template) {
        peftrt_chat_message msg = {"user", argv[2]};
        int32_t need = -peftrt_chat_apply_template(m, &msg, 1, true, NULL, 0);
        if (need <= 0) die("chat template");
        text = malloc((size_t)need);
        if (peftrt_chat_apply_template(m, &msg, 1, true, text, need) != need - 1) die("chat template");
    }
    const char *input = text ? text : argv[2];
    int32_t n = -peftrt_tokenize(m, input, !text, NULL, 0);
    if (n <= 0) die("tokenizing");
    peftrt_token *prompt = malloc((size_t)n * sizeof *prompt);
    if (peftrt_tokenize(m, input, !text, prompt, n) != n) die("tokenizing");

    peftrt_session_params sp = peftrt_session_default_params();
    sp.n_ctx = n + max_tokens;
    sp.n_batch = 16;
    sp.n_threads = 2;
    peftrt_session *s = peftrt_session_create(m, &sp);
    if (!s) die("creating a session");
    if (peftrt_session_set_adapters(s, adapters, scales, n_adapters)) die("setting adapters");
    if (peftrt_session_eval(s, prompt, n)) die("eval");
    int32_t n_vocab = 0;
    const float *logits = peftrt_session_logits(s, &n_vocab);
    if (!logits) die("logits");

    FILE *out = fopen(argv[3], "wb");
    if (!out) return 1;
    put_i32(out, n);
    fwrite(prompt, sizeof *prompt, (size_t)n, out);
    put_i32(out, n_vocab);
    fwrite(logits, sizeof *logits, (size_t)n_vocab, out);

    if (peftrt_session_reset(s)) die("reset");
    peftrt_sampling_params greedy = peftrt_sampling_default_params();
    greedy.max_tokens = max_tokens;
    peftrt_token *gen = malloc((size_t)max_tokens * sizeof *gen);
    peftrt_generation g = {.struct_size = sizeof g, .tokens = gen, .n_tokens_max = max_tokens};
    text_buf streamed = {NULL, 0};
    if (peftrt_session_generate(s, prompt, n, &greedy, append, &streamed, &g)) die("generate");
    put_i32(out, g.n_tokens);
    fwrite(gen, sizeof *gen, (size_t)g.n_tokens, out);
    put_i32(out, (int32_t)streamed.len);
    fwrite(streamed.text, 1, streamed.len, out);
    fclose(out);

    for (size_t i = 0; i < n_adapters; i++) peftrt_adapter_free(adapters[i]);
    peftrt_session_free(s);
    peftrt_model_free(m);
    free(streamed.text);
    free(gen);
    free(prompt);
    free(text);
    return 0;
}
