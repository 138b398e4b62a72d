//! The eBPF object as shipped (embedded in the `xlb` binary). LLVM's BPF
//! backend may lower a struct copy or zero fill to a call to
//! compiler_builtins' `memset`/`memcpy`/`memmove`: BPF subprograms that loop
//! byte by byte. One such call in the key built for every packet once cost
//! each packet ~25 ns, a third of a flow hit; `lb-ebpf/src/words.rs` is how
//! the datapath avoids them. This test keeps them out.

use anyhow::{Context, Result};
use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

#[test]
fn no_program_calls_a_bytewise_memory_function() -> Result<()> {
    let file = object::File::parse(xlb::dataplane::OBJECT).context("parsing the eBPF object")?;
    let mut calls = Vec::new();
    for section in file.sections() {
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let symbol = file.symbol_by_index(index)?;
            let name = symbol.name()?;
            if ["memset", "memcpy", "memmove", "memcmp"].contains(&name) {
                calls.push(format!("{} +{offset:#x}: {name}", section.name()?));
            }
        }
    }
    assert!(
        calls.is_empty(),
        "calls to bytewise memory functions (use words::zero/copy instead):\n{}",
        calls.join("\n")
    );
    Ok(())
}
