/*
 * Freeing a handle while another thread calls into it (issue #18): the call must either run on
 * a live object or get PEFTRT_ERR_INVALID_HANDLE, and peftrt_session_free must return
 * PEFTRT_ERR_BUSY (freeing nothing) while a call on the session is in flight — never a read
 * of freed memory. Run under valgrind by scripts/test-ffi.sh, which makes any invalid read
 * fail the run: before the fix a free landing between a call's handle check and its use of
 * the session succeeded, and the call then read the freed session.
 *
 *   free_race MODEL_DIR ADAPTER_DIR [ROUNDS]
 */
#include <peftrt.h>

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            failures++;                                                                                                \
            fprintf(stderr, "%s:%d: FAILED: %s (last error: %s)\n", __FILE__, __LINE__, #cond, peftrt_last_error());  \
        }                                                                                                              \
    } while (0)

/* What a racing call may return: it ran (OK), met the session in use (BUSY), or came after
   the free (INVALID_HANDLE). Anything else, or a crash, is a bug. */
static int allowed(int32_t st) {
    return st == PEFTRT_OK || st == PEFTRT_ERR_BUSY || st == PEFTRT_ERR_INVALID_HANDLE;
}

typedef struct {
    void *handle;    /* the session, model or adapter being freed */
    peftrt_model *m; /* a model that stays alive (for the adapter race) */
    atomic_int started;
    int calls, ran, bad; /* read after the join */
} race;

/* Calls into the session until it is gone. */
static void *session_caller(void *arg) {
    race *r = arg;
    peftrt_session *s = r->handle;
    peftrt_token t[2] = {1, 2};
    for (int i = 0;; i++) {
        int32_t st;
        switch (i % 5) {
        case 0: st = peftrt_session_eval(s, t, 1); break;
        case 1: st = peftrt_session_reset(s); break;
        case 2: st = peftrt_session_tokens(s, NULL, 0); st = st == PEFTRT_BUFFER_ERROR ? peftrt_last_status() : 0; break;
        case 3: st = peftrt_session_cancel(s); break;
        default: st = peftrt_session_set_sampling(s, NULL); break;
        }
        r->calls++;
        atomic_store(&r->started, 1);
        if (!allowed(st)) {
            r->bad++;
            fprintf(stderr, "session call %d: %s: %s\n", i % 5, peftrt_status_str(st), peftrt_last_error());
        }
        if (st == PEFTRT_OK) r->ran++;
        if (st == PEFTRT_ERR_INVALID_HANDLE) return NULL;
        /* Leave a gap after every 8th call: frees then meet both calls in flight (BUSY) and gaps. */
        if (r->calls % 8 == 0) sched_yield();
    }
}

/* Tokenizes with the model until it is gone. */
static void *model_caller(void *arg) {
    race *r = arg;
    peftrt_model *m = r->handle;
    peftrt_token t[16];
    for (;;) {
        int32_t n = peftrt_tokenize(m, "hello there", true, t, 16);
        int32_t st = n >= 0 ? PEFTRT_OK : peftrt_last_status();
        r->calls++;
        atomic_store(&r->started, 1);
        if (!allowed(st)) r->bad++;
        if (st == PEFTRT_OK) r->ran++;
        if (st == PEFTRT_ERR_INVALID_HANDLE) return NULL;
        /* Leave a gap after every 8th call: frees then meet both calls in flight (BUSY) and gaps. */
        if (r->calls % 8 == 0) sched_yield();
    }
}

/* Activates the adapter in a session of its own until the adapter handle is gone. */
static void *adapter_caller(void *arg) {
    race *r = arg;
    peftrt_adapter *a = r->handle;
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = 16;
    p.n_threads = 1;
    peftrt_session *s = peftrt_session_create(r->m, &p);
    CHECK(s != NULL);
    for (;;) {
        int32_t st = peftrt_session_set_adapters(s, &a, NULL, 1);
        r->calls++;
        atomic_store(&r->started, 1);
        if (!allowed(st)) r->bad++;
        if (st == PEFTRT_OK) r->ran++;
        if (st == PEFTRT_ERR_INVALID_HANDLE) break;
        if (r->calls % 8 == 0) sched_yield();
    }
    /* The session still holds the adapter it last activated, and evaluates with it. */
    peftrt_token t = 1;
    CHECK(peftrt_session_eval(s, &t, 1) == PEFTRT_OK);
    CHECK(peftrt_session_free(s) == PEFTRT_OK);
    return NULL;
}

/* Starts `caller` on `r`, lets it make a few calls, frees the handle with `free_fn` (retrying
   while it is BUSY) and joins. Returns how many frees were refused as BUSY. */
static int run_race(race *r, void *(*caller)(void *), peftrt_status (*free_fn)(void *), int spin) {
    atomic_init(&r->started, 0);
    r->calls = r->ran = r->bad = 0;
    pthread_t th;
    pthread_create(&th, NULL, caller, r);
    while (!atomic_load(&r->started)) sched_yield();
    for (int i = 0; i < spin; i++) sched_yield();
    int busy = 0;
    peftrt_status st;
    while ((st = free_fn(r->handle)) == PEFTRT_ERR_BUSY) {
        busy++;
        sched_yield();
    }
    CHECK(st == PEFTRT_OK);
    pthread_join(th, NULL);
    CHECK(r->bad == 0);
    /* Freed once: a second free is detected (no handle was created meanwhile). */
    CHECK(free_fn(r->handle) == PEFTRT_ERR_INVALID_HANDLE);
    return busy;
}

static peftrt_status free_session(void *h) { return peftrt_session_free(h); }
static peftrt_status free_model(void *h) { return peftrt_model_free(h); }
static peftrt_status free_adapter(void *h) { return peftrt_adapter_free(h); }

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_DIR [ROUNDS]\n", argv[0]);
        return 2;
    }
    const char *model_dir = argv[1], *adapter_dir = argv[2];
    int rounds = argc == 4 ? atoi(argv[3]) : 100;
    peftrt_model *m = peftrt_model_load(model_dir, NULL);
    if (!m) {
        fprintf(stderr, "free_race: cannot load %s: %s\n", model_dir, peftrt_last_error());
        return 1;
    }
    peftrt_session_params p = peftrt_session_default_params();
    p.n_ctx = 64;
    p.n_threads = 1;
    int busy = 0, ran = 0;
    for (int i = 0; i < rounds; i++) {
        race r = {.handle = peftrt_session_create(m, &p)};
        CHECK(r.handle != NULL);
        busy += run_race(&r, session_caller, free_session, i % 7);
        ran += r.ran;
    }
    printf("free_race: %d session rounds, %d calls ran, %d frees refused as busy\n", rounds, ran, busy);

    int model_rounds = rounds / 10 + 1;
    for (int i = 0; i < model_rounds; i++) {
        race r = {.handle = peftrt_model_load(model_dir, NULL)};
        CHECK(r.handle != NULL);
        run_race(&r, model_caller, free_model, i % 7);
    }
    for (int i = 0; i < model_rounds; i++) {
        race r = {.handle = peftrt_adapter_load(m, adapter_dir, NULL), .m = m};
        CHECK(r.handle != NULL);
        run_race(&r, adapter_caller, free_adapter, i % 7);
    }
    printf("free_race: %d model and %d adapter rounds\n", model_rounds, model_rounds);
    CHECK(peftrt_model_free(m) == PEFTRT_OK);
    printf("free_race: %d failed\n", failures);
    return failures ? 1 : 0;
}
