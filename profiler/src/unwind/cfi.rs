//! Compiles an ELF object's call-frame information (`.eh_frame`, else
//! `.debug_frame`) into the compact rows of `profiler_common::unwind`,
//! grouped by 64 KiB page.
use std::collections::HashMap;

use anyhow::{Context as _, bail};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};
use profiler_common::unwind::{
    CFA_DEREF_RBP, CFA_END, CFA_NONE, CFA_PLT, CFA_R11, CFA_RBP, CFA_RBX, CFA_RSP, CFA_SIGNAL,
    CFA_UNSUPPORTED, PAGE_MASK, PAGE_SHIFT, RBP_AT_RBP, RBP_OFFSET, RBP_SAME, RBP_UNDEFINED,
    RBX_AT_RBP, RBX_OFFSET, RBX_SAME, RBX_UNDEFINED, UnwindRow,
};

use super::expr::{self, CfaExpr, SavedAt};
use super::regs_row::regs_row;

/// The rows of one object, ready to load.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ObjectRows {
    /// All rows, page after page.
    pub rows: Vec<UnwindRow>,
    /// (page number, index of its first row in `rows`, row count).
    pub pages: Vec<(u32, u32, u32)>,
    /// Rows whose rule the kernel walker cannot evaluate.
    pub unsupported: usize,
    /// The unsupported rows by rule (a description of the rule, its row
    /// count), most frequent first.
    pub unsupported_rules: Vec<(String, usize)>,
}

/// A rule at a virtual address, before paging: the row it becomes (at page
/// offset 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Rule {
    row: UnwindRow,
    /// For `CFA_UNSUPPORTED`: index of the rule's description in
    /// [`Reasons`].
    reason: u32,
}

const NO_CFI: Rule = Rule::of(CFA_NONE);

impl Rule {
    /// The rule of `cfa_kind` without offsets (`CFA_NONE`, `CFA_END`,
    /// `CFA_SIGNAL`, `CFA_UNSUPPORTED`).
    const fn of(cfa_kind: u8) -> Self {
        Self {
            row: UnwindRow {
                cfa_kind,
                ..ZERO_ROW
            },
            reason: 0,
        }
    }

    fn row(&self, pc_low: u16) -> UnwindRow {
        UnwindRow { pc_low, ..self.row }
    }
}

const ZERO_ROW: UnwindRow = UnwindRow {
    pc_low: 0,
    cfa_offset: 0,
    rbp_offset: 0,
    rbx_offset: 0,
    cfa_kind: CFA_NONE,
    reg_kinds: 0,
};

/// Every (address, priority, rule) of an object before paging, each rule
/// interned: 16 bytes an entry rather than 48, since a large object
/// (libLLVM, librustc_driver) has millions of them and few distinct rules.
#[derive(Default)]
struct Entries {
    list: Vec<(u64, u8, u32)>,
    rules: Vec<Rule>,
    ids: HashMap<Rule, u32>,
}

impl Entries {
    fn push(&mut self, addr: u64, priority: u8, rule: Rule) {
        let next = self.rules.len() as u32;
        let id = *self.ids.entry(rule).or_insert_with(|| {
            self.rules.push(rule);
            next
        });
        self.list.push((addr, priority, id));
    }
}

/// Descriptions of the rules the walker cannot evaluate, interned.
#[derive(Default)]
struct Reasons {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Reasons {
    /// The unsupported rule described by `why`.
    fn rule(&mut self, why: String) -> Rule {
        let next = self.names.len() as u32;
        let reason = *self.index.entry(why.clone()).or_insert_with(|| {
            self.names.push(why);
            next
        });
        Rule {
            reason,
            ..Rule::of(CFA_UNSUPPORTED)
        }
    }
}

/// The load segments of an ELF file: (file offset, file size, virtual address).
pub fn load_segments(data: &[u8]) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let file = object::File::parse(data).context("parsing ELF")?;
    Ok(file
        .segments()
        .map(|s| {
            let (off, size) = s.file_range();
            (off, size, s.address())
        })
        .collect())
}

/// The object's GNU build id, if it has one.
pub fn build_id(data: &[u8]) -> Option<Vec<u8>> {
    let file = object::File::parse(data).ok()?;
    file.build_id().ok().flatten().map(<[u8]>::to_vec)
}

/// The object's `.eh_frame` (when it has a non-empty one) and the base
/// addresses its pointer encodings refer to.
pub fn eh_frame<'a>(
    file: &object::File<'a>,
) -> Option<(EhFrame<EndianSlice<'a, LittleEndian>>, BaseAddresses)> {
    let section = |name: &str| {
        file.section_by_name(name)
            .and_then(|s| Some((s.address(), s.data().ok()?)))
            .filter(|(_, d)| !d.is_empty())
    };
    let (addr, bytes) = section(".eh_frame")?;
    let mut bases = BaseAddresses::default().set_eh_frame(addr);
    if let Some((text, _)) = section(".text") {
        bases = bases.set_text(text);
    }
    if let Some((hdr, _)) = section(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(hdr);
    }
    if let Some((got, _)) = section(".got") {
        bases = bases.set_got(got);
    }
    Some((EhFrame::new(bytes, LittleEndian), bases))
}

/// Compiles the rows of the ELF object in `data`.
pub fn compile(data: &[u8]) -> anyhow::Result<ObjectRows> {
    let file = object::File::parse(data).context("parsing ELF")?;
    if file.architecture() != object::Architecture::X86_64 {
        bail!("not an x86-64 object");
    }
    let mut rules = Entries::default();
    let mut reasons = Reasons::default();
    if let Some((eh, bases)) = eh_frame(&file) {
        collect(&eh, &bases, &mut rules, &mut reasons)?;
    }
    if rules.list.is_empty()
        && let Some(bytes) = file
            .section_by_name(".debug_frame")
            .and_then(|s| s.data().ok())
            .filter(|d| !d.is_empty())
    {
        let mut df = DebugFrame::new(bytes, LittleEndian);
        df.set_address_size(8);
        collect(&df, &BaseAddresses::default(), &mut rules, &mut reasons)?;
    }
    // The ELF entry point is the first frame of a process. The dynamic
    // loader's (`_start`, `_dl_start_user`) has no FDE: where no FDE covers
    // it, the code from the entry to the next FDE ends the stack.
    let entry = file.entry();
    if entry != 0 && !covered(&rules.list, entry) {
        let next = rules
            .list
            .iter()
            .map(|&(a, _, _)| a)
            .filter(|&a| a > entry)
            .min()
            .unwrap_or(u64::MAX)
            .min(entry + ENTRY_CODE_MAX);
        rules.push(entry, 1, Rule::of(CFA_END));
        rules.push(next, 0, NO_CFI);
    }
    clone_returns(&file, &mut rules);
    // A lazy-binding .plt that no FDE describes (LLD writes none): the rows
    // ld.bfd writes for it, where the code has their layout.
    section_rows(&file, ".plt", &mut rules, super::plt::lazy_plt_rows);
    // glibc's `_init` and `_fini` (crti.o, crtn.o) have no CFI: their rows,
    // where the code is glibc's.
    for name in [".init", ".fini"] {
        section_rows(&file, name, &mut rules, super::crt::crt_rows);
    }
    // These PLT stubs only jump (`endbr64; jmp *GOT`): the return address
    // is at [rsp] throughout, but linkers do not always describe them.
    for name in [".plt.sec", ".plt.got"] {
        if let Some(s) = file.section_by_name(name) {
            let (start, end) = (s.address(), s.address() + s.size());
            if start < end
                && !rules
                    .list
                    .iter()
                    .any(|&(a, _, _)| (start..end).contains(&a))
            {
                let at_rsp = UnwindRow::new(0, CFA_RSP, 8, RBP_SAME, 0).expect("fits");
                rules.push(
                    start,
                    1,
                    Rule {
                        row: at_rsp,
                        reason: 0,
                    },
                );
                rules.push(end, 0, NO_CFI);
            }
        }
    }
    Ok(paginate(rules, &reasons.names))
}

/// Rows a recogniser finds for a section without CFI, from its start
/// address and bytes (None: not code it knows).
type SectionRows = fn(u64, &[u8]) -> Option<Vec<(u64, UnwindRow)>>;

/// Gives section `name` the rows `rows_of` finds for its code, when no FDE
/// describes any of it.
fn section_rows(file: &object::File, name: &str, rules: &mut Entries, rows_of: SectionRows) {
    let Some(s) = file.section_by_name(name) else {
        return;
    };
    let (start, end) = (s.address(), s.address() + s.size());
    if rules
        .list
        .iter()
        .any(|&(a, _, _)| (start..end).contains(&a))
    {
        return;
    }
    let Some(rows) = s.data().ok().and_then(|code| rows_of(start, code)) else {
        return;
    };
    for (addr, row) in rows {
        rules.push(addr, 1, Rule { row, reason: 0 });
    }
    rules.push(end, 0, NO_CFI);
}

/// Gives rows to the return paths of clone syscalls that no FDE covers
/// (see `clone_gap`).
fn clone_returns(file: &object::File, rules: &mut Entries) {
    let code: Vec<(u64, &[u8])> = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .filter_map(|s| Some((s.address(), s.data().ok()?)))
        .collect();
    let at = |addr: u64| {
        code.iter()
            .find(|(a, d)| *a <= addr && addr < a + d.len() as u64)
            .map(|(a, d)| &d[(addr - a) as usize..])
    };
    // Where an FDE ends on a syscall instruction: a handful in libc.
    let ends: Vec<u64> = rules
        .list
        .iter()
        .filter(|&&(a, p, _)| p == 0 && at(a).is_some_and(|c| c.starts_with(&[0x0f, 0x05])))
        .map(|&(a, _, _)| a)
        .collect();
    for end in ends {
        let rows = rules.list.iter().filter(|&&(_, p, _)| p == 1);
        if rows.clone().any(|&(a, _, _)| a == end) {
            continue;
        }
        let last = rows
            .clone()
            .filter(|&&(a, _, _)| a < end)
            .max_by_key(|&&(a, _, _)| a);
        let next = rows
            .filter(|&&(a, _, _)| a > end)
            .min_by_key(|&&(a, _, _)| a);
        let (Some(&(_, _, last)), Some(&(next, _, next_rule))) = (last, next) else {
            continue;
        };
        let (last, next_row) = (
            rules.rules[last as usize].row,
            rules.rules[next_rule as usize].row,
        );
        if super::clone_gap::is_clone_return(end, at(end).unwrap_or(&[]), &last, next, &next_row) {
            let row = super::clone_gap::clone_row();
            rules.push(end, 1, Rule { row, reason: 0 });
        }
    }
}

/// Longest entry-point code without an FDE taken as the outermost frame.
const ENTRY_CODE_MAX: u64 = 256;

/// Whether an FDE row covers `addr` (rows start at an FDE's rows and a
/// `NO_CFI` entry of priority 0 ends each FDE).
fn covered(rules: &[(u64, u8, u32)], addr: u64) -> bool {
    rules
        .iter()
        .filter(|&&(a, _, _)| a <= addr)
        .max_by_key(|&&(a, p, _)| (a, p))
        .is_some_and(|&(_, p, _)| p == 1)
}

/// Appends (address, priority, rule) for every row of every FDE; the end of
/// each FDE gets a `NO_CFI` entry of lower priority than any row starting
/// at the same address.
fn collect<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Entries,
    reasons: &mut Reasons,
) -> anyhow::Result<()>
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().context("reading CFI entries")? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // A malformed FDE only loses its own rows.
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        let signal = fde.is_signal_trampoline();
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            continue;
        };
        let mut last_end = fde.initial_address();
        loop {
            let row = match table.next_row() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(_) => {
                    // Rows past an evaluation error are unknown.
                    out.push(last_end, 1, reasons.rule("CFI error".to_owned()));
                    break;
                }
            };
            // A row at or past the FDE's end covers none of its code (BOLT
            // ends its FDEs with one, at the next function's first
            // instruction): kept, it would displace that function's own
            // first row, which starts at the same address.
            if row.start_address() >= fde.end_address() {
                break;
            }
            let rule = if signal {
                signal_rule()
            } else {
                convert(section, row)
                    .or_else(|why| regs_row(row).map(|row| Rule { row, reason: 0 }).ok_or(why))
                    .unwrap_or_else(|why| reasons.rule(why))
            };
            out.push(row.start_address(), 1, rule);
            last_end = row.end_address();
        }
        out.push(fde.end_address(), 0, NO_CFI);
    }
    Ok(())
}

fn signal_rule() -> Rule {
    Rule::of(CFA_SIGNAL)
}

/// The rule of `row`, or a description of why the walker cannot evaluate
/// it.
fn convert<'a, S>(section: &S, row: &gimli::UnwindTableRow<usize>) -> Result<Rule, String>
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let bytes = |e: &gimli::UnwindExpression<usize>| {
        e.get(section)
            .map(|e| e.0.slice().to_vec())
            .unwrap_or_default()
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return Ok(Rule::of(CFA_END));
        }
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(rule) => return Err(format!("ra: {}", describe(&rule, bytes))),
    }
    // The regular rows take the caller's rsp to be the CFA.
    match row.register(X86_64::RSP) {
        None | Some(RegisterRule::ValOffset(0)) => {}
        Some(rule) => return Err(format!("rsp: {}", describe(&rule, bytes))),
    }
    let (cfa_kind, cfa_offset, plt) = match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => match register {
            X86_64::RSP => (CFA_RSP, offset, 0),
            X86_64::RBP => (CFA_RBP, offset, 0),
            X86_64::RBX => (CFA_RBX, offset, 0),
            X86_64::R11 => (CFA_R11, offset, 0),
            r => return Err(format!("cfa: {}{offset:+}", expr::register_name(r.0))),
        },
        CfaRule::Expression(ref e) => {
            let code = bytes(e);
            match expr::cfa(&code) {
                Some(CfaExpr::Plt { threshold }) => (CFA_PLT, 8, i64::from(threshold)),
                Some(CfaExpr::DerefRbp { offset }) => (CFA_DEREF_RBP, offset, 0),
                None => return Err(format!("cfa: expr {}", expr::show(&code))),
            }
        }
    };
    let (rbp_kind, rbp_offset) = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => (RBP_SAME, plt),
        Some(RegisterRule::Offset(off)) if cfa_kind != CFA_PLT => (RBP_OFFSET, off),
        Some(RegisterRule::Expression(ref e)) if cfa_kind != CFA_PLT => {
            match expr::saved_at(&bytes(e)) {
                Some(SavedAt::Rbp(off)) => (RBP_AT_RBP, off),
                None => {
                    return Err(format!(
                        "rbp: {}",
                        describe(&RegisterRule::Expression(*e), bytes)
                    ));
                }
            }
        }
        Some(RegisterRule::Undefined) => (RBP_UNDEFINED, plt),
        Some(rule) => return Err(format!("rbp: {}", describe(&rule, bytes))),
    };
    // rbx matters only to a CFA based on it (a stack switch): a rule that
    // does not fit makes rbx unknown, and such a CFA then stops the walk.
    let (rbx_kind, rbx_offset) = match row.register(X86_64::RBX) {
        None | Some(RegisterRule::SameValue) => (RBX_SAME, 0),
        Some(RegisterRule::Offset(off)) => (RBX_OFFSET, off),
        Some(RegisterRule::Expression(ref e)) => match expr::saved_at(&bytes(e)) {
            Some(SavedAt::Rbp(off)) => (RBX_AT_RBP, off),
            None => (RBX_UNDEFINED, 0),
        },
        Some(_) => (RBX_UNDEFINED, 0),
    };
    // Offsets the row format cannot hold make the rule unsupported; an rbx
    // slot that does not fit only makes rbx unknown.
    let Some(row) = UnwindRow::new(0, cfa_kind, cfa_offset, rbp_kind, rbp_offset) else {
        return Err(format!(
            "offset out of range: cfa {cfa_offset:+}, rbp {rbp_offset:+}"
        ));
    };
    let row = row
        .with_rbx(rbx_kind, rbx_offset)
        .or_else(|| row.with_rbx(RBX_UNDEFINED, 0))
        .expect("an undefined rbx always fits");
    Ok(Rule { row, reason: 0 })
}

/// A register rule, for the report of unsupported rules.
fn describe(
    rule: &RegisterRule<usize>,
    bytes: impl Fn(&gimli::UnwindExpression<usize>) -> Vec<u8>,
) -> String {
    match rule {
        RegisterRule::Offset(off) => format!("at cfa{off:+}"),
        RegisterRule::ValOffset(off) => format!("cfa{off:+}"),
        RegisterRule::Register(r) => expr::register_name(r.0).to_owned(),
        RegisterRule::Expression(e) => format!("at expr {}", expr::show(&bytes(e))),
        RegisterRule::ValExpression(e) => format!("expr {}", expr::show(&bytes(e))),
        other => format!("{other:?}"),
    }
}

/// Sorts the rules, drops redundant ones and splits them into pages whose
/// first row is at page offset 0.
fn paginate(entries: Entries, reasons: &[String]) -> ObjectRows {
    let Entries {
        list: mut flat,
        rules,
        ..
    } = entries;
    // At one address the higher priority (a row starting there) wins over
    // the end of the previous FDE.
    flat.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    flat.dedup_by_key(|r| r.0);
    // A rule repeated at the next address adds nothing (interned: equal
    // rules have equal ids).
    flat.dedup_by(|next, kept| next.2 == kept.2);
    flat.shrink_to_fit();
    let rule = |i: usize| rules[flat[i].2 as usize];
    let mut out = ObjectRows::default();
    let mut by_reason = vec![0; reasons.len()];
    for &(_, _, id) in &flat {
        let r = rules[id as usize];
        if r.row.kind() == CFA_UNSUPPORTED {
            out.unsupported += 1;
            if let Some(n) = by_reason.get_mut(r.reason as usize) {
                *n += 1;
            }
        }
    }
    out.unsupported_rules = reasons.iter().cloned().zip(by_reason).collect();
    out.unsupported_rules
        .sort_by_key(|r| std::cmp::Reverse(r.1));
    let row = |addr: u64, r: &Rule| r.row((addr & PAGE_MASK) as u16);
    let mut i = 0;
    while i < flat.len() {
        let page = flat[i].0 >> PAGE_SHIFT;
        let page_start = page << PAGE_SHIFT;
        let first = out.rows.len();
        // The rule in force where the page begins.
        if flat[i].0 != page_start {
            let carried = if i > 0 { rule(i - 1) } else { NO_CFI };
            out.rows.push(row(page_start, &carried));
        }
        while i < flat.len() && flat[i].0 >> PAGE_SHIFT == page {
            out.rows.push(row(flat[i].0, &rule(i)));
            i += 1;
        }
        push_page(&mut out, page, first);
        // Pages entirely covered by the last rule (a function > 64 KiB).
        let carried = rule(i - 1);
        let next = flat.get(i).map_or(page + 1, |(a, _, _)| a >> PAGE_SHIFT);
        if carried != NO_CFI {
            for p in page + 1..next {
                let first = out.rows.len();
                out.rows.push(row(p << PAGE_SHIFT, &carried));
                push_page(&mut out, p, first);
            }
        }
    }
    out
}

fn push_page(out: &mut ObjectRows, page: u64, first: usize) {
    let rows = &out.rows[first..];
    // A page with no CFI at all needs no entry: missing pages mean the same.
    if rows.iter().all(|r| r.kind() == CFA_NONE) {
        out.rows.truncate(first);
        return;
    }
    out.pages
        .push((page as u32, first as u32, (out.rows.len() - first) as u32));
}

#[cfg(test)]
#[path = "cfi_tests.rs"]
mod tests;
