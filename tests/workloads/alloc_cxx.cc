// A C++ program exercising every operator new/delete form through the
// standard library: containers, strings, smart pointers, over-aligned
// types, nothrow and array forms, and std::bad_alloc on failure. Prints a
// deterministic summary, so runs with and without a preloaded allocator
// must print the same thing.
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

struct alignas(64) Line {
    uint64_t v[8];
};

struct alignas(4096) Page {
    char bytes[4096];
};

static uint64_t work(int seed) {
    std::map<std::string, std::vector<int>> m;
    std::unordered_map<int, std::string> u;
    uint64_t sum = 0;
    for (int i = 0; i < 20000; i++) {
        std::string key = "key-" + std::to_string((i * 7919 + seed) % 5000);
        m[key].push_back(i);
        u[i % 3000] = key + key;
        if (i % 3 == 0) m.erase("key-" + std::to_string(i % 5000));
    }
    for (auto &kv : m) sum += kv.first.size() * 31 + kv.second.size();
    for (auto &kv : u) sum += kv.second.size();
    return sum;
}

int main() {
    uint64_t total = 0;
    // Containers on several threads (thread caches, cross-thread frees).
    std::vector<std::thread> threads;
    std::vector<uint64_t> results(4);
    for (int t = 0; t < 4; t++)
        threads.emplace_back([t, &results] { results[t] = work(t); });
    for (auto &th : threads) th.join();
    for (auto r : results) total += r;

    // Over-aligned new/delete (single and array), sized delete.
    for (int i = 0; i < 1000; i++) {
        auto *l = new Line();
        auto *ls = new Line[17]();
        auto *p = new Page();
        if (reinterpret_cast<uintptr_t>(l) % 64 || reinterpret_cast<uintptr_t>(ls) % 64 ||
            reinterpret_cast<uintptr_t>(p) % 4096) {
            std::printf("misaligned\n");
            return 1;
        }
        l->v[0] = i;
        total += l->v[0] + ls[16].v[7] + p->bytes[100];
        delete l;
        delete[] ls;
        delete p;
    }
    // nothrow forms.
    int *n = new (std::nothrow) int[1000]();
    Line *nl = new (std::nothrow) Line();
    total += n[999] + nl->v[3];
    delete[] n;
    delete nl;
    // Failure: std::bad_alloc thrown through the allocator's operator new.
    bool caught = false;
    try {
        volatile size_t huge = size_t(1) << 62;
        char *never = new char[huge];
        never[0] = 1;
    } catch (const std::bad_alloc &) {
        caught = true;
    }
    char *none = new (std::nothrow) char[size_t(1) << 62];
    auto shared = std::make_shared<std::vector<std::string>>(100, std::string(100, 'x'));
    total += shared->size();
    std::printf("total %llu bad_alloc %d nothrow-null %d\n", (unsigned long long)total, caught,
                none == nullptr);
    return 0;
}
