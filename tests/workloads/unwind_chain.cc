// The C++ variant of unwind_chain.c: the same 6-deep chain through a
// namespace, a class template and a lambda, allocating with operator new
// (libstdc++) or burning CPU. Built with -O2 -fomit-frame-pointer.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace chain {

static volatile unsigned long spin_sink;
static bool mode_alloc;

__attribute__((noinline)) int leaf(int n) {
    if (mode_alloc) {
        auto v = std::make_unique<std::vector<int>>(25 + n % 50, n);
        return (*v)[n % v->size()];
    }
    unsigned long x = n;
    for (int i = 0; i < 300; i++) x = x * 6364136223846793005UL + 1442695040888963407UL;
    spin_sink = x;
    return static_cast<int>(x & 1);
}

template <int N>
struct Level {
    __attribute__((noinline)) static int level(int n);
};

__attribute__((noinline)) int level5(int n) { int r = leaf(n + 1); spin_sink += r; return r + 5; }
template <>
__attribute__((noinline)) int Level<4>::level(int n) { int r = level5(n + 1); spin_sink += r; return r + 4; }
__attribute__((noinline)) int level3(int n) {
    std::function<int(int)> f = [](int m) { return Level<4>::level(m); };
    int r = f(n + 1);
    spin_sink += r;
    return r + 3;
}
__attribute__((noinline)) int level2(int n) { int r = level3(n + 1); spin_sink += r; return r + 2; }
__attribute__((noinline)) int level1(int n) { int r = level2(n + 1); spin_sink += r; return r + 1; }

}  // namespace chain

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " alloc|spin SECONDS\n";
        return 2;
    }
    chain::mode_alloc = std::string(argv[1]) == "alloc";
    double seconds = std::atof(argv[2]);
    std::cout << "ready" << std::endl;
    std::string line;
    if (!std::getline(std::cin, line)) return 1;
    auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    long calls = 0;
    while (std::chrono::steady_clock::now() < end) {
        for (int i = 0; i < 100; i++) chain::level1(i);
        calls += 100;
    }
    std::cout << "done\ncalls " << calls << std::endl;
    while (std::getline(std::cin, line)) {
    }
    return 0;
}
