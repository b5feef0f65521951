// peftrt.hpp — a small header-only C++17 wrapper over the C API (include/peftrt.h):
// RAII handles, exceptions for errors, std::string / std::vector in and out, and a
// std::function streaming callback. Copy it into a project as is; it adds no state of its own.
#pragma once

#include <peftrt.h>

#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace peftrt {

// A failed call: the status and the library's message.
class Error : public std::runtime_error {
  public:
    Error(peftrt_status status, const std::string &what)
        : std::runtime_error(what + ": " + peftrt_last_error() + " [" + peftrt_status_str(status) + "]"),
          status_(status) {}
    peftrt_status status() const { return status_; }

  private:
    peftrt_status status_;
};

namespace detail {
inline void check(peftrt_status s, const char *what) {
    if (s != PEFTRT_OK) throw Error(s, what);
}
template <class T> T *check_handle(T *p, const char *what) {
    if (!p) throw Error(peftrt_last_status(), what);
    return p;
}
// Runs a buffer-filling function twice at most: once to learn the size, once to fill.
template <class T, class F> std::vector<T> fill(F f, const char *what, size_t guess = 256) {
    std::vector<T> buf(guess);
    for (int tries = 0; tries < 2; tries++) {
        int32_t n = f(buf.data(), static_cast<int32_t>(buf.size()));
        if (n == PEFTRT_BUFFER_ERROR) throw Error(peftrt_last_status(), what);
        if (n >= 0) {
            buf.resize(static_cast<size_t>(n));
            return buf;
        }
        buf.resize(static_cast<size_t>(-n));
    }
    throw std::logic_error(std::string(what) + ": the size changed between calls");
}
struct ModelFree {
    void operator()(peftrt_model *p) const { peftrt_model_free(p); }
};
struct AdapterFree {
    void operator()(peftrt_adapter *p) const { peftrt_adapter_free(p); }
};
struct SessionFree {
    void operator()(peftrt_session *p) const { peftrt_session_free(p); }
};
} // namespace detail

using Tokens = std::vector<peftrt_token>;

struct Message {
    std::string role;
    std::string content;
};

// A loaded model; shared read-only by any number of threads.
class Model {
  public:
    explicit Model(const std::string &path, const peftrt_model_params &params = peftrt_model_default_params())
        : p_(detail::check_handle(peftrt_model_load(path.c_str(), &params), "loading a model")) {}

    peftrt_model_info info() const {
        peftrt_model_info i{};
        i.struct_size = sizeof i;
        detail::check(peftrt_model_get_info(p_.get(), &i), "model info");
        return i;
    }

    Tokens tokenize(const std::string &text, bool add_special) const {
        return detail::fill<peftrt_token>(
            [&](peftrt_token *b, int32_t n) { return peftrt_tokenize(p_.get(), text.c_str(), add_special, b, n); },
            "tokenizing");
    }

    std::string detokenize(const Tokens &tokens, bool skip_special = false) const {
        auto v = detail::fill<char>(
            [&](char *b, int32_t n) {
                return peftrt_detokenize(p_.get(), tokens.data(), static_cast<int32_t>(tokens.size()), skip_special,
                                         b, n);
            },
            "detokenizing");
        return std::string(v.data(), v.empty() ? 0 : v.size());
    }

    std::string chat_template(const std::vector<Message> &messages, bool add_generation_prompt = true) const {
        std::vector<peftrt_chat_message> m;
        for (const auto &msg : messages) m.push_back({msg.role.c_str(), msg.content.c_str()});
        auto v = detail::fill<char>(
            [&](char *b, int32_t n) {
                return peftrt_chat_apply_template(p_.get(), m.data(), m.size(), add_generation_prompt, b, n);
            },
            "applying the chat template", 4096);
        return std::string(v.data(), v.size());
    }

    peftrt_model *get() const { return p_.get(); }

  private:
    std::unique_ptr<peftrt_model, detail::ModelFree> p_;
};

// A PEFT adapter loaded for one model.
class Adapter {
  public:
    Adapter(const Model &model, const std::string &path,
            const peftrt_adapter_params &params = peftrt_adapter_default_params())
        : p_(detail::check_handle(peftrt_adapter_load(model.get(), path.c_str(), &params), "loading an adapter")) {}
    peftrt_adapter *get() const { return p_.get(); }

  private:
    std::unique_ptr<peftrt_adapter, detail::AdapterFree> p_;
};

// One conversation; used by one thread at a time (cancel() from any thread).
class Session {
  public:
    explicit Session(const Model &model, const peftrt_session_params &params = peftrt_session_default_params())
        : p_(detail::check_handle(peftrt_session_create(model.get(), &params), "creating a session")) {}

    void reset() { detail::check(peftrt_session_reset(p_.get()), "resetting"); }

    // The active adapters with their scales; empty = none.
    void set_adapters(const std::vector<std::pair<const Adapter *, float>> &active) {
        std::vector<peftrt_adapter *> a;
        std::vector<float> s;
        for (const auto &[adapter, scale] : active) {
            a.push_back(adapter->get());
            s.push_back(scale);
        }
        detail::check(peftrt_session_set_adapters(p_.get(), a.data(), s.data(), a.size()), "setting adapters");
    }

    void eval(const Tokens &tokens) {
        detail::check(peftrt_session_eval(p_.get(), tokens.data(), static_cast<int32_t>(tokens.size())), "eval");
    }

    std::vector<float> logits() {
        int32_t n = 0;
        const float *l = peftrt_session_logits(p_.get(), &n);
        if (!l) throw Error(peftrt_last_status(), "logits");
        return std::vector<float>(l, l + n);
    }

    // Streams text to `on_text` (return false to stop); an exception thrown by it stops
    // generation and is rethrown here.
    peftrt_generation generate(const Tokens &prompt, const peftrt_sampling_params &params,
                               const std::function<bool(std::string_view)> &on_text = {}) {
        struct Ctx {
            const std::function<bool(std::string_view)> *f;
            std::exception_ptr error;
        } ctx{&on_text, nullptr};
        auto trampoline = [](const char *text, size_t len, void *user) -> int {
            auto *c = static_cast<Ctx *>(user);
            try {
                return (*c->f)(std::string_view(text, len)) ? 0 : 1;
            } catch (...) { // never let an exception cross the C library
                c->error = std::current_exception();
                return 1;
            }
        };
        peftrt_generation g{};
        g.struct_size = sizeof g;
        peftrt_status s = peftrt_session_generate(p_.get(), prompt.data(), static_cast<int32_t>(prompt.size()),
                                                  &params, on_text ? +trampoline : nullptr, &ctx, &g);
        if (ctx.error) std::rethrow_exception(ctx.error);
        detail::check(s, "generating");
        return g;
    }

    // Output constrained to a JSON Schema, any JSON object, a regex or a Lark grammar, for
    // sample() and generate() (see peftrt_session_set_constraint). A text that does not compile
    // throws Error with PEFTRT_ERR_CONSTRAINT_INVALID and the compiler's message.
    void set_constraint(peftrt_constraint_kind kind, std::string_view text = {}) {
        detail::check(peftrt_session_set_constraint(p_.get(), kind, text.data(), text.size()), "setting a constraint");
    }
    void clear_constraint() { detail::check(peftrt_session_clear_constraint(p_.get()), "clearing the constraint"); }

    // The sampler of sample(); generate() takes its own params.
    void set_sampling(const peftrt_sampling_params &params) {
        detail::check(peftrt_session_set_sampling(p_.get(), &params), "setting sampling");
    }
    // The next token from the last logits (within the constraint, if any); not evaluated.
    peftrt_token sample() {
        peftrt_token t = 0;
        detail::check(peftrt_session_sample(p_.get(), &t), "sampling");
        return t;
    }

    void cancel() { peftrt_session_cancel(p_.get()); }

    peftrt_session *get() const { return p_.get(); }

  private:
    std::unique_ptr<peftrt_session, detail::SessionFree> p_;
};

inline std::string version() { return peftrt_version(); }

} // namespace peftrt
