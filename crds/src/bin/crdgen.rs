//! Prints the generated CustomResourceDefinitions as YAML (`cargo run -p kpipe-api --bin crdgen`).

use std::process::ExitCode;

fn main() -> ExitCode {
    match kpipe_api::crd_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("crdgen: cannot serialise the CRD: {err}");
            ExitCode::FAILURE
        }
    }
}
