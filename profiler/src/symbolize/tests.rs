use super::*;

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
