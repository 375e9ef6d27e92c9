//! `strait`: every daemon and every operator command in one executable (the sidecar proxy is
//! also built alone as `strait-sidecar`, see src/bin/strait-sidecar.rs).

mod cmd;
mod install;
mod up;

fn main() -> std::process::ExitCode {
    let cli = cmd::parse();
    strait::init_tracing(&cli.log);
    let sidecar = matches!(cli.command, cmd::Command::Sidecar(_));
    strait::main(sidecar, cmd::dispatch(cli))
}
