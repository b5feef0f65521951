// chat: a multi-turn chat on the terminal with the C++ wrapper (peftrt.hpp). Reads one user
// message per line from stdin, streams each reply. Optional adapters: DIR or DIR:SCALE. With
// --json, every reply is a JSON object (a constraint: tokens that would break it are never
// sampled).
//
//   chat [--json] MODEL_DIR [ADAPTER[:SCALE]...]   (then type; an empty line or end of input quits)
#include "peftrt.hpp"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

int main(int argc, char **argv) {
    bool json = argc > 1 && std::string(argv[1]) == "--json";
    if (json) {
        argv++;
        argc--;
    }
    if (argc < 2) {
        std::cerr << "usage: chat [--json] MODEL_DIR [ADAPTER[:SCALE]...]\n";
        return 2;
    }
    try {
        peftrt::Model model(argv[1]);
        if (!model.info().has_chat_template) {
            std::cerr << "chat: this model has no chat template\n";
            return 1;
        }
        std::vector<peftrt::Adapter> adapters;
        std::vector<float> scales;
        for (int i = 2; i < argc; i++) {
            std::string arg = argv[i];
            auto colon = arg.rfind(':');
            float scale = 1.0f;
            if (colon != std::string::npos) {
                scale = std::stof(arg.substr(colon + 1));
                arg = arg.substr(0, colon);
            }
            adapters.emplace_back(model, arg);
            scales.push_back(scale);
        }
        std::vector<std::pair<const peftrt::Adapter *, float>> active;
        for (size_t i = 0; i < adapters.size(); i++) active.emplace_back(&adapters[i], scales[i]);

        const int32_t n_ctx = std::min(model.info().n_ctx_train, 4096); // the session's default
        peftrt::Session session(model);
        session.set_adapters(active);
        if (json) session.set_constraint(PEFTRT_CONSTRAINT_JSON_OBJECT);
        peftrt_sampling_params params = peftrt_sampling_default_params();
        params.max_tokens = 64;

        std::vector<peftrt::Message> history;
        std::string line;
        std::cerr << "peftrt " << peftrt::version() << ": type a message (empty line quits)\n";
        while (std::cout << "> " << std::flush, std::getline(std::cin, line) && !line.empty()) {
            history.push_back({"user", line});
            // The whole conversation is re-read each turn: simple, and cheap for short chats.
            // When it no longer fits with room for a reply, the oldest exchanges are dropped.
            auto prompt = model.tokenize(model.chat_template(history), false);
            while (prompt.size() + params.max_tokens > static_cast<size_t>(n_ctx) && history.size() > 1) {
                history.erase(history.begin(), history.begin() + std::min<size_t>(2, history.size() - 1));
                prompt = model.tokenize(model.chat_template(history), false);
            }
            session.reset();
            std::string reply;
            auto g = session.generate(prompt, params,
                                      [&](std::string_view piece) {
                                          std::cout << piece << std::flush;
                                          reply += piece;
                                          return true;
                                      });
            std::cout << "\n";
            std::cerr << "[" << g.n_tokens << " tokens, " << g.decode_ms << " ms]\n";
            history.push_back({"assistant", reply});
        }
        return 0;
    } catch (const std::exception &e) {
        std::cerr << "chat: " << e.what() << "\n";
        return 1;
    }
}
