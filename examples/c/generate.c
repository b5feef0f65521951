/*
 * generate: load a model, render a chat prompt with the model's own template, stream the
 * reply to stdout. Timings go to stderr.
 *
 *   generate MODEL_DIR [PROMPT] [MAX_TOKENS]
 */
#include <peftrt.h>

#include <stdio.h>
#include <stdlib.h>

static int fail(const char *what) {
    fprintf(stderr, "generate: %s: %s (%s)\n", what, peftrt_last_error(), peftrt_status_str(peftrt_last_status()));
    return 1;
}

/* Streams each piece of text as it completes; 0 = keep going. */
static int print_piece(const char *text, size_t len, void *user_data) {
    (void)user_data;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [PROMPT] [MAX_TOKENS]\n", argv[0]);
        return 2;
    }
    const char *prompt = argc > 2 ? argv[2] : "Write a haiku about a lighthouse.";
    int max_tokens = argc > 3 ? atoi(argv[3]) : 64;

    peftrt_model *model = peftrt_model_load(argv[1], NULL);
    if (!model) return fail("loading the model");
    peftrt_model_info info = {.struct_size = sizeof info};
    if (peftrt_model_get_info(model, &info) != PEFTRT_OK) return fail("model info");
    fprintf(stderr, "%s: %d layers, vocabulary %d, trained context %d\n", info.architecture, info.n_layers,
            info.vocab_size, info.n_ctx_train);

    /* The chat prompt: the template's text for one user message and the assistant's turn. */
    char *text = NULL;
    if (info.has_chat_template) {
        peftrt_chat_message msg = {.role = "user", .content = prompt};
        int32_t need = -peftrt_chat_apply_template(model, &msg, 1, true, NULL, 0);
        if (need <= 0) return fail("chat template");
        text = malloc((size_t)need);
        if (peftrt_chat_apply_template(model, &msg, 1, true, text, need) < 0) return fail("chat template");
    }

    /* Tokens: ask for the size first (a negative count), then fill. */
    const char *input = text ? text : prompt;
    int32_t n = -peftrt_tokenize(model, input, !text, NULL, 0);
    if (n <= 0) return fail("tokenizing");
    peftrt_token *tokens = malloc((size_t)n * sizeof *tokens);
    if (peftrt_tokenize(model, input, !text, tokens, n) != n) return fail("tokenizing");

    peftrt_session *session = peftrt_session_create(model, NULL);
    if (!session) return fail("creating a session");
    peftrt_sampling_params sp = peftrt_sampling_default_params();
    sp.max_tokens = max_tokens;
    peftrt_generation g = {.struct_size = sizeof g};
    if (peftrt_session_generate(session, tokens, n, &sp, print_piece, NULL, &g) != PEFTRT_OK)
        return fail("generating");
    printf("\n");
    fprintf(stderr, "%d prompt tokens in %.1f ms, %d tokens in %.1f ms (stop reason %d)\n", g.n_prompt_tokens,
            g.prefill_ms, g.n_tokens, g.decode_ms, (int)g.stop);

    peftrt_session_free(session);
    peftrt_model_free(model);
    free(tokens);
    free(text);
    return 0;
}
