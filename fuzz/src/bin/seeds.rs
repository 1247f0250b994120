//! Writes the seed inputs of one fuzz target into a corpus directory:
//! `toe-fuzz-seeds <target> <dir>`.

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [target, dir] = args.as_slice() else {
        eprintln!("usage: toe-fuzz-seeds <target> <corpus dir>");
        std::process::exit(2);
    };
    std::fs::create_dir_all(dir)?;
    for (name, data) in toe_fuzz::seeds(target)? {
        std::fs::write(std::path::Path::new(dir).join(format!("seed-{name}")), data)?;
    }
    Ok(())
}
