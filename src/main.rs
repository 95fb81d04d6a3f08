//! The `longshore` binary: wires the runtime (`longshore-workers`) to the job kinds
//! (`longshore-jobs`). Each command lives in its own file under `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
