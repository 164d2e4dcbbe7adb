// C++ symbolization test program: return addresses inside a namespaced
// method and a template instance ("SITE <name> <address>"), then "ready";
// exits on a line on stdin. Built with -O1 -g.
#include <cstdio>

extern "C" __attribute__((noinline)) void report(const char *site) {
    std::printf("SITE %s %p\n", site, __builtin_return_address(0));
}

namespace shapes {
struct Widget {
    int size;
    __attribute__((noinline)) int compute(int x);
};

int Widget::compute(int x) {
    report("site_method");
    return size * x;
}

template <typename T>
__attribute__((noinline)) T scaled(T v) {
    report("site_template");
    return v * 2;
}
}  // namespace shapes

int main() {
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    shapes::Widget w{3};
    volatile int r = w.compute(4) + shapes::scaled<int>(5);
    (void)r;
    std::puts("ready");
    char line[64];
    if (!std::fgets(line, sizeof line, stdin))
        return 0;
    return 0;
}
