use super::*;

#[test]
fn the_object_cache_drops_the_least_recently_used_beyond_its_bound() {
    let dir = std::env::temp_dir().join(format!("prof-bpf-lru-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, size: usize| {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; size]).unwrap();
        path
    };
    let (a, b, c) = (file("a", 100), file("b", 100), file("c", 100));
    let cache = SymbolCache::with_mapped_bound(250);
    let mut objects = cache.objects.borrow_mut();
    let first_a = objects.symbolizer_for(&a);
    let first_b = objects.symbolizer_for(&b);
    assert_eq!((objects.mapped, objects.entries.len()), (200, 2));
    // a is used again, so b is the one dropped for c.
    assert!(Rc::ptr_eq(&first_a, &objects.symbolizer_for(&a)));
    objects.symbolizer_for(&c);
    assert_eq!((objects.mapped, objects.entries.len()), (200, 2));
    assert!(Rc::ptr_eq(&first_a, &objects.symbolizer_for(&a)));
    assert!(!Rc::ptr_eq(&first_b, &objects.symbolizer_for(&b)));
    // An object larger than the bound is kept alone.
    let big = file("big", 1000);
    objects.symbolizer_for(&big);
    assert_eq!((objects.mapped, objects.entries.len()), (1000, 1));
    drop(objects);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parses_perf_maps() {
    let map = parse_perf_map(
        "7f0000001000 20 LazyCompile:~foo a.js:1\n7f0000000000 100 stub\nbad line\n",
    );
    assert_eq!(
        map,
        vec![
            (0x7f0000000000, 0x100, "stub".to_owned()),
            (0x7f0000001000, 0x20, "LazyCompile:~foo a.js:1".to_owned()),
        ]
    );
}
