//! `strait`: every daemon and every operator command in one executable (the sidecar proxy is
//! also built alone as `strait-sidecar`, see src/bin/strait-sidecar.rs).

mod cmd;
mod install;
mod up;

fn main() -> std::process::ExitCode {
    let cli = cmd::parse();
    strait::init_tracing(&cli.log);
    // The sidecar and the controller run one thread by default (`strait::main`).
    let one_thread = matches!(cli.command, cmd::Command::Sidecar(_) | cmd::Command::Federation(_));
    strait::main(one_thread, cmd::dispatch(cli))
}
